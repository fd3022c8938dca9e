"""The latency-against-throughput plot of load points (matplotlib, imported on use)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.harness.h2load import Point


def plot(
    path: Path,
    title: str,
    curves: Mapping[str, Sequence[Point]],
    *,
    target_ms: float | None = 5.0,
    styles: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """Latency (p99 solid, p50 dashed, log scale) against throughput, one colour a curve."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9, 5.5))
    palette = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    for name, points in curves.items():
        style = dict((styles or {}).get(name, {}))
        color = style.pop("color", None) or next(palette)
        # the open-loop points as the curve; the closed-loop peak (whose latency only says how
        # many calls the load kept in flight) as a star; paced points as diamonds
        opened = sorted((p for p in points if p.mode == "open"), key=lambda p: p.rps)
        if opened:
            xs = [p.rps for p in opened]
            ax.plot(xs, [p.p99_ms for p in opened], "o-", color=color, label=f"{name} p99",
                    **style)  # fmt: skip
            ax.plot(xs, [p.p50_ms for p in opened], "s--", color=color, alpha=0.5,
                    label=f"{name} p50")  # fmt: skip
        for p in points:
            if p.mode == "closed":
                ax.plot([p.rps], [p.p99_ms], "*", color=color, markersize=12)
                ax.axvline(p.rps, color=color, lw=0.6, ls=":", alpha=0.6)
            elif p.mode.startswith("paced"):
                ax.plot([p.rps], [p.p99_ms], "D", color=color, markersize=7,
                        markeredgecolor="black")  # fmt: skip
    if target_ms is not None:
        ax.axhline(target_ms, color="tab:red", lw=0.8, ls=":", label=f"p99 target {target_ms} ms")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("throughput (requests/s, log scale)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title + "\n(star: closed-loop peak; diamond: p99 with paced callers)",
                 fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
