"""Phases 3 and 4: the no-op echoes (``bench.echo_server``, the real answer's bytes) on each
runtime, paced at the server's own rates, and the floor (the echo plus one budgeted HMGET and
the canonical log line)."""

from __future__ import annotations

import asyncio
import sys

from bench.harness import Point, ServerProcess, ServerStats, free_port, pinned, report
from bench.serving.state import REFERENCE_RUNTIME, EchoResult, Run, ServerResult
from bench.serving_data import call_once, page, page_fields


def start_echo(run: Run, runtime: str, name: str, extra: list[str]) -> tuple[ServerProcess, int]:
    """``bench.echo_server`` on ``runtime`` answering the page (``extra``: the floor's args)."""
    resp_file = run.workdir / "response.bin"
    resp_file.write_bytes(run.response)
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "bench.echo_server",
        "--listen",
        f"127.0.0.1:{port}",
        "--workers",
        str(run.args.workers),
        "--response",
        str(resp_file),
        "--runtime",
        runtime,
        *extra,
    ]
    echo = ServerProcess(pinned(run.server_cpus, args), run.env, run.workdir / f"{name}.log")
    try:
        answer = call_once(f"127.0.0.1:{port}", run.requests[run.args.batch])
    except BaseException:
        echo.stop()
        raise
    if answer != run.response:
        run.problems.append(f"{name} answer differs from the server's")
    return echo, port


def measure_echo(
    run: Run,
    runtime: str,
    fractions: list[float],
    paced_rate: float | None,
    paced_more: dict[float, float] | None = None,
) -> EchoResult:
    print(f"echo on {runtime} (same harness, same response bytes)", flush=True)
    echo, port = start_echo(run, runtime, f"echo-{runtime}", [])
    stats = ServerStats(redis_pid=None)
    name = f"echo/{runtime}"
    try:
        peak, points = run.harness.curve(
            echo, stats, name, port, run.bodies[run.args.batch], fractions
        )
        paced = None
        if paced_rate:
            paced = run.harness.run_paced(
                echo, stats, name, port, run.bodies[run.args.batch], paced_rate
            )
            report(paced)
        more = {}
        for frac, rate in (paced_more or {}).items():
            more[frac] = run.harness.run_paced(
                echo, stats, name, port, run.bodies[run.args.batch], rate
            )
            report(more[frac])
    finally:
        echo.stop()
    return EchoResult(runtime, peak, points, paced, more)


def floor_args(run: Run) -> list[str]:
    key, fields = asyncio.run(page_fields(run.settings, page(run.cat, run.args.batch)))
    return ["--floor-redis", run.redis.url, "--floor-key", key, "--floor-fields", ",".join(fields)]


def measure_peak(run: Run, runtime: str, name: str, extra: list[str]) -> Point:
    """One echo's (``extra``: the floor's) closed-loop peak."""
    server, port = start_echo(run, runtime, name, extra)
    stats = ServerStats(redis_pid=run.redis_pid if extra else None)
    try:
        point = run.harness.run(server, stats, name, port, run.bodies[run.args.batch], None)
        report(point)
        return point
    finally:
        server.stop()


def measure_echoes(
    run: Run, runtimes: list[str], servers: dict[str, ServerResult], fractions: list[float]
) -> dict[str, EchoResult]:
    """The reference runtime's echo and each measured runtime's, paced (``--paced``) at that
    runtime's server's own rates."""
    echoes: dict[str, EchoResult] = {}
    for rt in dict.fromkeys([REFERENCE_RUNTIME, *runtimes]):
        paced_rate = servers[rt].peak.rps * 0.7 if run.args.paced and rt in servers else None
        more = {f: p.rps for f, p in servers[rt].paced_more.items()} if rt in servers else {}
        echoes[rt] = measure_echo(run, rt, fractions, paced_rate, more)
    return echoes


def measure_floor(run: Run, runtime: str) -> tuple[Point, list[str]]:
    """``--floor``: the floor's peak on ``runtime``, and the echo arguments that make it one."""
    extra = floor_args(run)
    print(f"floor on {runtime} (echo + one HMGET + the log line)", flush=True)
    return measure_peak(run, runtime, f"floor-{runtime}", extra), extra
