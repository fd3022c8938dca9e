"""Phase 5 (``--rounds N``): every peak again, one after the other in each of N-1 more rounds,
so that a host whose speed drifts from minute to minute weighs on all of them alike; each
round's peak rates and ratios."""

from __future__ import annotations

from typing import Any

from bench.harness import Point
from bench.serving.echo import measure_peak
from bench.serving.server import server_peak_again
from bench.serving.state import REFERENCE_RUNTIME, EchoResult, Run, ServerResult


def more_rounds(
    run: Run, runtimes: list[str], echoes: dict[str, EchoResult], floor_extra: list[str]
) -> list[dict[str, Any]]:
    """Rounds 2..N: the servers', echoes' and (``--floor``) the floor's peaks again."""
    args = run.args
    primary = runtimes[0]
    rounds = []
    for k in range(1, args.rounds):
        print(f"round {k + 1} of {args.rounds}", flush=True)
        again = {rt: server_peak_again(run, rt, k + 1) for rt in runtimes}
        echo_peaks = {rt: measure_peak(run, rt, f"echo-{rt}-round{k + 1}", []) for rt in echoes}
        fl = measure_peak(run, primary, f"floor-round{k + 1}", floor_extra) if args.floor else None
        rounds.append(_round_of(again, echo_peaks, fl))
    return rounds


def first_round(
    servers: dict[str, ServerResult], echoes: dict[str, EchoResult], floor: Point | None
) -> dict[str, Any]:
    return _round_of(
        {rt: s.peak for rt, s in servers.items()}, {rt: e.peak for rt, e in echoes.items()}, floor
    )


def _round_of(
    servers: dict[str, Point], echoes: dict[str, Point], floor: Point | None
) -> dict[str, Any]:
    """One round's peak rates (requests/s) and their ratios."""
    ref = echoes.get(REFERENCE_RUNTIME)
    out: dict[str, Any] = {
        "echo_rps": round(ref.rps, 1) if ref else None,
        "floor_rps": round(floor.rps, 1) if floor else None,
        "floor_ratio_to_echo": round(floor.rps / ref.rps, 3) if floor and ref else None,
    }
    for rt, p in servers.items():
        own = echoes.get(rt)
        out[rt] = {
            "rps": round(p.rps, 1),
            "ratio_to_echo": round(p.rps / ref.rps, 3) if ref else None,
            "ratio_to_runtime_echo": round(p.rps / own.rps, 3) if own else None,
            "runtime_echo_rps": round(own.rps, 1) if own else None,
        }
    return out
