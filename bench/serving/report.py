"""Phase 6: the report: each runtime's figures and the issue's targets, the summary lines, the
``--otel`` export's counts, the plot; the JSON object printed last is built here."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness import Point, median, plot
from bench.serving.state import (
    HARNESS_ALLOWANCE_MS,
    P99_TARGET_MS,
    REFERENCE_RUNTIME,
    EchoResult,
    Run,
    ServerResult,
)
from pricing_testing.otlp import OtlpReceiver


def _r(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def runtime_summary(
    run: Run,
    s: ServerResult,
    echoes: dict[str, EchoResult],
    one: Point | None,
    rounds: list[dict[str, Any]],
) -> dict[str, Any]:
    """One runtime's figures and the issue's targets."""
    a = run.args
    ref = echoes.get(REFERENCE_RUNTIME)
    own = echoes.get(s.runtime)
    at70 = s.points[0.7]
    echo_paced = own.paced_at_server_rate if own else None
    paced_limit = None
    if s.paced is not None:
        paced_limit = P99_TARGET_MS
        if echo_paced is not None:
            paced_limit = max(P99_TARGET_MS, echo_paced.p99_ms + HARNESS_ALLOWANCE_MS)
    peak = s.peak
    out: dict[str, Any] = {
        "rps": round(peak.rps, 1),
        "items_per_s": round(peak.rps * a.batch, 1),
        "p50_ms": peak.p50_ms,
        "p99_ms": peak.p99_ms,
        "server_cpu_us_per_req": _r(peak.server_cpu_us_per_req),
        "redis_cpu_us_per_req": _r(peak.redis_cpu_us_per_req),
        "h2load_cpu_us_per_req": _r(peak.h2load_cpu_us_per_req),
        "core_busy_at_peak": peak.core_busy,
        "p50_ms_at_70pct": at70.p50_ms,
        "p99_ms_at_70pct": at70.p99_ms,
        "rps_at_70pct": round(at70.rps, 1),
        "p99_ms_at_70pct_paced": s.paced.p99_ms if s.paced else None,
        "p50_ms_at_70pct_paced": s.paced.p50_ms if s.paced else None,
        "rps_at_70pct_paced": round(s.paced.rps, 1) if s.paced else None,
        "paced_point": asdict(s.paced) if s.paced else None,
        # every paced point with the runtime's echo at the same rate and the p99 limit there
        "paced_curve": paced_curve(s, own),
        # the harness at the same rate: this runtime's echo, paced at the server's 70 % rate
        "echo_p99_ms_at_server_70pct_paced": echo_paced.p99_ms if echo_paced else None,
        "echo_paced_point": asdict(echo_paced) if echo_paced else None,
        "p99_paced_limit_ms": paced_limit,
        "p99_paced_ok": (s.paced.p99_ms <= paced_limit)
        if s.paced and paced_limit is not None
        else None,
        "echo_rps": round(ref.peak.rps, 1) if ref else None,
        "ratio_to_echo": round(peak.rps / ref.peak.rps, 3) if ref else None,
        "cpu_ratio_to_echo": round(ref.peak.server_cpu_us_per_req / peak.server_cpu_us_per_req, 3)
        if ref and ref.peak.server_cpu_us_per_req and peak.server_cpu_us_per_req
        else None,
        "runtime_echo_rps": round(own.peak.rps, 1) if own else None,
        "runtime_echo_cpu_us_per_req": _r(own.peak.server_cpu_us_per_req) if own else None,
        "ratio_to_runtime_echo": round(peak.rps / own.peak.rps, 3) if own else None,
        "ratio_to_echo_median": median(
            [rd.get(s.runtime, {}).get("ratio_to_echo") for rd in rounds]
        ),
        "ratio_to_runtime_echo_median": median(
            [rd.get(s.runtime, {}).get("ratio_to_runtime_echo") for rd in rounds]
        ),
        "checks": s.checks,
        "curve": [asdict(p) for p in [peak, *s.points.values()]],
    }
    if s.scaling is not None:
        out[f"rps_batch{a.scaling_batch}"] = round(s.scaling.rps, 1)
        out[f"items_per_s_batch{a.scaling_batch}"] = round(s.scaling.rps * a.scaling_batch, 1)
        out["batch_cost_ratio"] = round(peak.rps / s.scaling.rps, 3)
        if s.scaling.server_cpu_us_per_req and peak.server_cpu_us_per_req:
            out["batch_cpu_ratio"] = round(
                s.scaling.server_cpu_us_per_req / peak.server_cpu_us_per_req, 3
            )
    if one is not None:
        # --workers N: the machine's CPU at the peak, split; and N workers' CPU per request
        # against one worker's, measured in the same run
        elapsed_cpu = sum(peak.core_busy.values())
        server_share = (peak.server_cpu_us_per_req or 0) * peak.rps / 1e6
        redis_share = (peak.redis_cpu_us_per_req or 0) * peak.rps / 1e6
        h2load_share = (peak.h2load_cpu_us_per_req or 0) * peak.rps / 1e6
        out["cpu_split_at_peak"] = {
            "cores_busy": round(elapsed_cpu, 3),
            "servers": round(server_share, 3),
            "redis": round(redis_share, 3),
            "h2load": round(h2load_share, 3),
            "other": round(elapsed_cpu - server_share - redis_share - h2load_share, 3),
        }
        out["one_worker_rps"] = round(one.rps, 1)
        out["one_worker_cpu_us_per_req"] = _r(one.server_cpu_us_per_req)
        if one.server_cpu_us_per_req and peak.server_cpu_us_per_req:
            out["cpu_per_req_ratio_to_one_worker"] = round(
                peak.server_cpu_us_per_req / one.server_cpu_us_per_req, 3
            )
    if own is not None:
        out["runtime_echo_curve"] = [asdict(p) for p in [own.peak, *own.points.values()]]
    return out


def paced_curve(s: ServerResult, own: EchoResult | None) -> list[dict[str, Any]]:
    points = dict(s.paced_more)
    if s.paced is not None:
        points[0.7] = s.paced
    echo_points = dict(own.paced_more) if own else {}
    if own and own.paced_at_server_rate:
        echo_points[0.7] = own.paced_at_server_rate
    out = []
    for frac in sorted(points):
        p, e = points[frac], echo_points.get(frac)
        limit = max(P99_TARGET_MS, e.p99_ms + HARNESS_ALLOWANCE_MS) if e else P99_TARGET_MS
        out.append({
            "fraction": frac,
            "rps": round(p.rps, 1),
            "p50_ms": p.p50_ms,
            "p99_ms": p.p99_ms,
            "server_cpu_us_per_req": _r(p.server_cpu_us_per_req),
            "core_busy": p.core_busy,
            "echo_p99_ms": e.p99_ms if e else None,
            "limit_ms": limit,
            "ok": p.p99_ms <= limit,
        })  # fmt: skip
    return out


def summarise(
    run: Run,
    runtimes: list[str],
    servers: dict[str, ServerResult],
    echoes: dict[str, EchoResult],
    one_worker: dict[str, Point],
    floor: Point | None,
    rounds: list[dict[str, Any]],
) -> dict[str, Any]:
    a = run.args
    per = {
        rt: runtime_summary(run, servers[rt], echoes, one_worker.get(rt), rounds) for rt in runtimes
    }
    primary = runtimes[0]
    ref = echoes.get(REFERENCE_RUNTIME)
    out: dict[str, Any] = {
        "bench": "serving",
        "runtime": primary,
        "runtimes": per,
        "workers": a.workers,
        "batch": a.batch,
        "crowds": a.crowds,
        "duration_s": a.duration,
        "clients": a.clients,
        "streams": a.streams,
        "pinned": run.server_cpus is not None,
        "membership_budget_ms": a.membership_budget_ms,
        "echo_rps": round(ref.peak.rps, 1) if ref else None,
        "echo_cpu_us_per_req": _r(ref.peak.server_cpu_us_per_req) if ref else None,
        "floor_rps": round(floor.rps, 1) if floor else None,
        "floor_ratio_to_echo": round(floor.rps / ref.peak.rps, 3) if floor and ref else None,
        "floor_ratio_to_echo_median": median([rd["floor_ratio_to_echo"] for rd in rounds]),
        "rounds": rounds,
        "ok": not run.problems,
        "problems": run.problems,
        "echo_curves": {
            rt: [asdict(p) for p in [e.peak, *e.points.values()]] for rt, e in echoes.items()
        },
    }
    # the primary runtime's figures at the top level too (earlier runs' keys)
    for key in (
        "rps",
        "items_per_s",
        "p50_ms",
        "p99_ms",
        "p99_ms_at_70pct",
        "p99_ms_at_70pct_paced",
        "server_cpu_us_per_req",
        "ratio_to_echo",
        "ratio_to_runtime_echo",
        "ratio_to_echo_median",
        "batch_cost_ratio",
    ):
        out[key] = per[primary].get(key)
    for rt, fig in per.items():
        print(
            f"summary {rt}: rps {fig['rps']} ({fig['items_per_s']} items/s), "
            f"cpu/req {fig['server_cpu_us_per_req']} us, ratio_to_echo {fig['ratio_to_echo']} "
            f"(median {fig['ratio_to_echo_median']}), ratio_to_runtime_echo "
            f"{fig['ratio_to_runtime_echo']}, p99 at 70% open {fig['p99_ms_at_70pct']} ms, "
            f"paced {fig['p99_ms_at_70pct_paced']} ms (limit {fig['p99_paced_limit_ms']}, "
            f"echo same rate {fig['echo_p99_ms_at_server_70pct_paced']}), batch cost ratio "
            f"{fig.get('batch_cost_ratio')}"
            + (
                f", CPU/req vs 1 worker {fig.get('cpu_per_req_ratio_to_one_worker')}, split "
                f"{fig.get('cpu_split_at_peak')}"
                if a.workers > 1
                else ""
            )
        )
    print(f"ok {out['ok']} {run.problems}")
    return out


def otel_figures(
    mode: str, receiver: OtlpReceiver, servers: dict[str, ServerResult]
) -> dict[str, Any]:
    """``--otel``: the spans received per RPC (every server has stopped: their last spans are
    flushed)."""
    ok = sum(s.checks["ok_rpcs"] + s.checks["cancelled_by_h2load_exit"] for s in servers.values())
    out: dict[str, Any] = {
        "otel_spans_received": receiver.span_count,
        "otel_export_requests": receiver.requests,
        "otel_spans_per_rpc": round(receiver.span_count / ok, 4) if ok else None,
    }
    print(
        f"otel {mode}: {receiver.span_count} spans received in {receiver.requests} "
        f"OTLP requests, {out['otel_spans_per_rpc']} per RPC",
        flush=True,
    )
    return out


def plot_run(run: Run, servers: dict[str, ServerResult], echoes: dict[str, EchoResult]) -> None:
    """Every server's and echo's curve in one plot (``--plot``)."""
    args = run.args
    title = (
        f"BatchGetLowestPrice, batch {args.batch}, --workers {args.workers}, "
        f"{os.cpu_count()} cores{' (server pinned to CPU 1)' if run.server_cpus else ''}"
    )
    curves: dict[str, list[Point]] = {}
    for rt, s in servers.items():
        paced_pts = [*([s.paced] if s.paced else []), *s.paced_more.values()]
        curves[f"server/{rt}"] = [s.peak, *s.points.values(), *paced_pts]
    for rt, e in echoes.items():
        paced = [e.paced_at_server_rate] if e.paced_at_server_rate else []
        curves[f"echo/{rt}"] = [e.peak, *e.points.values(), *paced, *e.paced_more.values()]
    plot(Path(args.plot), title, curves)
