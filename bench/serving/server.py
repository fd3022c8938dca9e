"""Phase 2: the real server, per runtime: verified item by item, its curve (closed-loop peak,
open-loop fractions), paced points, the batch scaling point, the checks after the load; one
worker's peak (``--workers N > 1``) and the peaks of later rounds."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    Point,
    ServerProcess,
    ServerStats,
    count_log_lines,
    free_port,
    free_port_block,
    pinned,
    report,
    scrape,
)
from bench.serving.state import Run, ServerResult, paced_fractions
from bench.serving_data import check_answer, verified_call


@dataclass
class StartedServer:
    """A server under test, its ports, and what the harness reads of it."""

    process: ServerProcess
    port: int
    stats: ServerStats
    metrics_ports: list[int]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(
    run: Run, runtime: str, log: Path, workers: int, cpus: str | None
) -> StartedServer:
    """``python -m pricing_service serve --workers N`` on ``runtime``, on free ports (one
    metrics port per worker)."""
    port = free_port()
    metrics_base = free_port_block(workers)
    metrics_ports = [metrics_base + i for i in range(workers)]
    env = dict(run.env)
    env.update(
        {
            "PRICING_SERVER_RUNTIME": runtime,
            "PRICING_LISTEN": f"127.0.0.1:{port}",
            "PRICING_METRICS_PORT": str(metrics_base),
        }
    )
    args = [sys.executable, "-m", "pricing_service", "serve", "--workers", str(workers)]
    stats = ServerStats(scrape=lambda: scrape(metrics_ports), redis_pid=run.redis_pid)
    return StartedServer(ServerProcess(pinned(cpus, args), env, log), port, stats, metrics_ports)


def measure_server(
    run: Run, runtime: str, fractions: list[float], label: str | None = None
) -> ServerResult:
    """The server on ``runtime``: verified, its curve, paced 70 %, batch scaling, checks
    (``label``: the name of a variant of the runtime's settings, for logs and reports)."""
    label = label or runtime
    a = run.args
    log = run.workdir / f"server-{label}.log"
    print(f"server on {label}: --workers {a.workers}, batch {a.batch}", flush=True)
    started = start_server(run, runtime, log, a.workers, run.server_cpus)
    server, port, stats, target = started.process, started.port, started.stats, started.target
    metrics_ports = started.metrics_ports
    h = run.harness
    paced = scaling = None
    try:
        batches = [a.batch] + ([a.scaling_batch] if a.scaling_batch else [])
        responses = {b: verified_call(target, run.requests[b], run.expected[b]) for b in batches}
        discounted = check_answer(responses[a.batch], run.expected[a.batch])
        print(f"  verified: {discounted} of {a.batch} items discounted, not degraded")
        run.response = responses[a.batch]
        before = _sums(scrape(metrics_ports))
        log_before = count_log_lines(log, "rpc_finished")
        name = f"server/{label}"
        peak, points = h.curve(server, stats, name, port, run.bodies[a.batch], fractions)
        paced_more: dict[float, Point] = {}
        if a.paced:
            paced = h.run_paced(server, stats, name, port, run.bodies[a.batch], peak.rps * 0.7)
            report(paced)
            for frac in paced_fractions(a):
                paced_more[frac] = h.run_paced(
                    server, stats, name, port, run.bodies[a.batch], peak.rps * frac
                )
                report(paced_more[frac])
        if a.scaling_batch:
            scaling = h.run(server, stats, name, port, run.bodies[a.scaling_batch], None)
            print(f"  batch {a.scaling_batch}:", end="")
            report(scaling)
        # correctness after load: still the right answer, every RPC OK, nothing degraded
        verified_call(target, run.requests[a.batch], run.expected[a.batch])
        after = _sums(scrape(metrics_ports))
        log_after = count_log_lines(log, "rpc_finished")
    finally:
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"server exited {code}:\n{log.read_text()[-4000:]}")
    all_points = [peak, *points.values(), *paced_more.values(), *[p for p in (scaling, paced) if p]]
    rpcs = after["ok"] - before["ok"]
    sent = sum(p.requests for p in all_points)
    cancelled = after["cancelled"] - before["cancelled"]
    checks = {
        "not_ok_rpcs": after["not_ok"] - before["not_ok"],
        "cancelled_by_h2load_exit": cancelled,
        "degraded_answers": after["degraded"] - before["degraded"],
        "ok_rpcs": rpcs,
        "h2load_requests": sent,
        "h2load_failed": sum(p.failed for p in all_points),
        "rpc_log_lines": log_after - log_before,
    }
    print(f"  server checks: {checks}")
    if checks["not_ok_rpcs"] or checks["degraded_answers"] or checks["h2load_failed"]:
        run.problems.append(f"{runtime}: errors or degraded answers under load")
    if rpcs < sent:  # h2load counts only the measured window; the server also saw warm-up
        run.problems.append(f"{runtime}: server counted {rpcs:.0f} OK RPCs, h2load {sent}")
    if checks["rpc_log_lines"] != rpcs + cancelled:
        run.problems.append(f"{runtime}: not one rpc_finished log line per RPC")
    return ServerResult(runtime, peak, points, paced, scaling, checks, paced_more)


def _sums(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """The counters that matter, summed over every worker."""
    sums = {"ok": 0.0, "not_ok": 0.0, "cancelled": 0.0, "degraded": 0.0}
    for name, labels, value in samples:
        if name == "pricing_rpc_requests_total" and labels.get("method") == "BatchGetLowestPrice":
            code = labels.get("code")
            # CANCELLED: calls in flight when an h2load run ends and drops its connections
            key = "ok" if code == "OK" else "cancelled" if code == "CANCELLED" else "not_ok"
            sums[key] += value
        elif name == "pricing_degraded_answers_total":
            sums["degraded"] += value
    return sums


def one_worker_peak(run: Run, runtime: str) -> Point:
    """With ``--workers N > 1``: one worker's peak under the same (un)pinning, for the CPU per
    request comparison."""
    log = run.workdir / f"server-{runtime}-1worker.log"
    return _peak(run, start_server(run, runtime, log, 1, None), f"1 worker/{runtime}")


def server_peak_again(run: Run, runtime: str, r: int) -> Point:
    """``--rounds``: the server's closed-loop peak again, in round ``r``."""
    log = run.workdir / f"server-{runtime}-round{r}.log"
    started = start_server(run, runtime, log, run.args.workers, run.server_cpus)
    point = _peak(run, started, f"server/{runtime}")
    if point.failed or point.degraded:
        run.problems.append(f"round {r} ({runtime}): errors or degraded answers under load")
    return point


def _peak(run: Run, started: StartedServer, name: str) -> Point:
    """One verified closed-loop peak of a started server, which is stopped afterwards."""
    batch = run.args.batch
    try:
        verified_call(started.target, run.requests[batch], run.expected[batch])
        point = run.harness.run(
            started.process, started.stats, name, started.port, run.bodies[batch], None
        )
        report(point)
        return point
    finally:
        started.process.stop()
