"""Serving benchmark: BatchGetLowestPrice of the real server on each server runtime, against
no-op gRPC echo servers, in one run and one harness.

Phases (each a function below):

1. **Data** (``bench.serving_data``): a private ``redis-server`` and a SQLite rule store get
   realistic data; the page is ``--batch`` items over 10 sellers; its exact answer comes from
   the pure engine.
2. **Server, per runtime** (``--runtime``, comma-separated; ``all`` = every runtime):
   ``python -m pricing_service serve --workers N`` on that runtime. One real call is checked
   item by item before any load. ``h2load`` (nghttp2's C load generator) then measures the
   closed-loop peak (``--clients`` x ``--streams``), open-loop points at fractions of it
   (h2load's ``--rps``), with ``--paced`` the 70 % point from paced callers, and the
   ``--scaling-batch`` peak. After the load the server's counters must show every RPC OK, no
   degraded answer, and its log one ``rpc_finished`` line per RPC.
3. **Echoes**: ``bench.echo_server`` (same process model and options, a pre-built copy of the
   real answer, no pipeline) on grpcio-aio — the fixed reference of ``ratio_to_echo`` — and on
   each other runtime measured (``ratio_to_runtime_echo``: the gap our own Python leaves). With
   ``--paced`` each runtime's echo is also measured paced **at the server's own 70 % rate**:
   the harness's floor at that rate (the p99 target is 5 ms, or that echo's p99 + 2 ms where
   the harness itself cannot show 5 ms).
4. ``--floor``: the echo plus only one budgeted HMGET and the canonical log line per RPC.
5. ``--rounds N``: N-1 more rounds of every peak, back to back; medians of the ratios.
6. With ``--workers N > 1`` also one worker's peak (same pinning: none), so that the CPU per
   request of N workers is compared with one's in the same run.

Every load point reports the server's CPU per request, the load generator's (h2load) and
Redis's, each core's busy share (pinned: CPU 0 carries h2load and Redis, CPU 1 the server),
and the server's own view: the membership round trip to Redis and the RPC's latency inside the
server. A harness limit (a saturated load core, slow Redis replies) is then visible as such.

    python -m bench.serving --runtime all --workers 1 --batch 20 --duration 10 --paced \\
        --plot docs/benchmarks/serving-runtimes.png

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    Harness,
    Point,
    ServerProcess,
    ServerStats,
    count_log_lines,
    free_port,
    free_port_block,
    median,
    percentile,
    pinned,
    plot,
    report,
    scrape,
)
from bench.serving_data import (
    BUYER,
    CURRENCY,
    ITEMS_PER_SELLER,
    METHOD,
    NAMESPACE,
    OTHER_BUYERS,
    PAGE_SELLERS,
    SELLERS,
    Catalog,
    DegradedAnswer,
    call_once,
    catalog,
    check_answer,
    expected_answer,
    grpc_frame,
    load_data,
    page,
    page_fields,
    request_bytes,
    verified_call,
)
from pricing_service.runtime import RUNTIME_MODULES
from tests.support.otlp import OtlpReceiver
from tests.support.redis_server import RedisServer

__all__ = [  # the data and the answer checks, for bench.hotpath and the unit tests
    "BUYER",
    "CURRENCY",
    "ITEMS_PER_SELLER",
    "NAMESPACE",
    "OTHER_BUYERS",
    "PAGE_SELLERS",
    "SELLERS",
    "Catalog",
    "DegradedAnswer",
    "call_once",
    "catalog",
    "check_answer",
    "expected_answer",
    "grpc_frame",
    "load_data",
    "main",
    "page",
    "page_fields",
    "percentile",
    "request_bytes",
    "verified_call",
]

REFERENCE_RUNTIME = "grpcio-aio"  # ratio_to_echo's fixed reference
#: ``--otel``: the servers' sampler (``OTEL_TRACES_SAMPLER``, ``_ARG``); h2load sends no
#: ``traceparent``, so every call is a root sampled at the ratio.
OTEL_MODES: dict[str, tuple[str, str] | None] = {
    "off": None,
    "1%": ("parentbased_traceidratio", "0.01"),
    "100%": ("parentbased_always_on", ""),
}
P99_TARGET_MS = 5.0
HARNESS_ALLOWANCE_MS = 2.0  # over the echo's p99 at the same rate, where 5 ms cannot be shown


def _median(values: Sequence[float | None]) -> float | None:
    return median(values)


def _r(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


# --- the run's shared state -------------------------------------------------------------------


@dataclass
class Run:
    """Everything the phases share: settings, data, harness, processes' placement."""

    args: argparse.Namespace
    workdir: Path
    redis: RedisServer
    harness: Harness
    env: dict[str, str]
    settings: Any
    cat: Catalog
    server_cpus: str | None
    bodies: dict[int, Path] = field(default_factory=dict)
    requests: dict[int, bytes] = field(default_factory=dict)
    expected: dict[int, list[tuple[str, int, str]]] = field(default_factory=dict)
    #: the real answer of the page (the echoes answer these bytes)
    response: bytes = b""
    problems: list[str] = field(default_factory=list)

    @property
    def redis_pid(self) -> int | None:
        return self.redis.proc.pid if self.redis.proc else None


@dataclass
class ServerResult:
    """One runtime's server measurements."""

    runtime: str
    peak: Point
    points: dict[float, Point]
    paced: Point | None = None
    scaling: Point | None = None
    checks: dict[str, float] = field(default_factory=dict)
    #: ``--paced-fractions`` other than 0.7: paced points at those fractions of the peak
    paced_more: dict[float, Point] = field(default_factory=dict)


# --- phase 1: data ------------------------------------------------------------------------------


def prepare(run: Run) -> None:
    t0 = time.monotonic()
    asyncio.run(load_data(run.settings, run.cat, crowds=getattr(run.args, "crowds", "builtin")))
    print(
        f"data loaded in {time.monotonic() - t0:.1f} s: {SELLERS * ITEMS_PER_SELLER * 3} rules, "
        f"{OTHER_BUYERS + 1} buyers",
        flush=True,
    )
    batches = [run.args.batch] + ([run.args.scaling_batch] if run.args.scaling_batch else [])
    for b in batches:
        items = page(run.cat, b)
        run.requests[b] = request_bytes(items)
        run.bodies[b] = run.workdir / f"request-{b}.bin"
        run.bodies[b].write_bytes(grpc_frame(run.requests[b]))
        run.expected[b] = asyncio.run(expected_answer(run.settings, items))


# --- phase 2: the server, per runtime -----------------------------------------------------------


def start_server(
    run: Run, runtime: str, log: Path, workers: int, port: int, metrics: int, cpus: str | None
) -> ServerProcess:
    env = dict(run.env)
    env.update(
        {
            "PRICING_SERVER_RUNTIME": runtime,
            "PRICING_LISTEN": f"127.0.0.1:{port}",
            "PRICING_METRICS_PORT": str(metrics),
        }
    )
    args = [sys.executable, "-m", "pricing_service", "serve", "--workers", str(workers)]
    return ServerProcess(pinned(cpus, args), env, log)


def measure_server(
    run: Run, runtime: str, fractions: list[float], label: str | None = None
) -> ServerResult:
    """The server on ``runtime``: verified, its curve, paced 70 %, batch scaling, checks
    (``label``: the name of a variant of the runtime's settings, for logs and reports)."""
    label = label or runtime
    a = run.args
    port = free_port()
    metrics_base = free_port_block(a.workers)
    metrics_ports = [metrics_base + i for i in range(a.workers)]
    stats = ServerStats(scrape=lambda: scrape(metrics_ports), redis_pid=run.redis_pid)
    target = f"127.0.0.1:{port}"
    log = run.workdir / f"server-{label}.log"
    print(f"server on {label}: --workers {a.workers}, batch {a.batch}", flush=True)
    server = start_server(run, runtime, log, a.workers, port, metrics_base, run.server_cpus)
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
    port = free_port()
    metrics = free_port()
    stats = ServerStats(scrape=lambda: scrape([metrics]), redis_pid=run.redis_pid)
    log = run.workdir / f"server-{runtime}-1worker.log"
    server = start_server(run, runtime, log, 1, port, metrics, None)
    try:
        verified_call(
            f"127.0.0.1:{port}", run.requests[run.args.batch], run.expected[run.args.batch]
        )
        point = run.harness.run(
            server, stats, f"1 worker/{runtime}", port, run.bodies[run.args.batch], None
        )
        report(point)
        return point
    finally:
        server.stop()


# --- phase 3/4: echoes and the floor --------------------------------------------------------------


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


@dataclass
class EchoResult:
    runtime: str
    peak: Point
    points: dict[float, Point]
    #: paced at the server's own 70 % rate on this runtime: the harness's p99 there
    paced_at_server_rate: Point | None = None
    #: paced at the server's other ``--paced-fractions`` rates
    paced_more: dict[float, Point] = field(default_factory=dict)


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


def server_peak_again(run: Run, runtime: str, r: int) -> Point:
    a = run.args
    port = free_port()
    metrics_base = free_port_block(a.workers)
    ports = [metrics_base + i for i in range(a.workers)]
    stats = ServerStats(scrape=lambda: scrape(ports), redis_pid=run.redis_pid)
    log = run.workdir / f"server-{runtime}-round{r}.log"
    server = start_server(run, runtime, log, a.workers, port, metrics_base, run.server_cpus)
    try:
        verified_call(f"127.0.0.1:{port}", run.requests[a.batch], run.expected[a.batch])
        point = run.harness.run(server, stats, f"server/{runtime}", port, run.bodies[a.batch], None)
        report(point)
    finally:
        server.stop()
    if point.failed or point.degraded:
        run.problems.append(f"round {r} ({runtime}): errors or degraded answers under load")
    return point


# --- main -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    p.add_argument(
        "--runtime",
        default=None,
        help="server runtime(s), comma-separated, or 'all' (default: the server's default, "
        "PRICING_SERVER_RUNTIME's)",
    )
    p.add_argument("--workers", type=int, default=1, help="server (and echo) processes")
    p.add_argument("--batch", type=int, default=20, help="items per request")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    p.add_argument("--warmup", type=float, default=1.0, help="h2load warm-up seconds per point")
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help="h2load connections (default 4 per worker: SO_REUSEPORT spreads connections, not "
        "requests, so 4 connections over 2 workers can land 3 and 1)",
    )
    p.add_argument("--streams", type=int, default=4, help="streams per connection (closed loop)")
    p.add_argument(
        "--fractions",
        default="0.25,0.5,0.7,0.9",
        help="open-loop rates as fractions of the peak (0.7 is always measured)",
    )
    p.add_argument(
        "--paced",
        action="store_true",
        help="also measure the 70 %% point with paced callers (no h2load rate bursts), and "
        "each runtime's echo paced at that rate",
    )
    p.add_argument(
        "--paced-fractions",
        default="0.7",
        help="with --paced: the fractions of the peak measured with paced callers (0.7 always), "
        "each also on the runtime's echo at the same rate",
    )
    p.add_argument(
        "--scaling-batch",
        type=int,
        default=100,
        help="also measure the server's peak at this batch size (0 = skip)",
    )
    p.add_argument(
        "--membership-budget-ms",
        type=int,
        default=None,
        help="PRICING_MEMBERSHIP_BUDGET_MS of the server (default: the server's own, 50 ms)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="peak rounds: after the full run, N-1 more rounds of every server's and echo's "
        "(and the floor's) peak, back to back; the medians of the ratios are reported",
    )
    p.add_argument(
        "--crowds",
        choices=["builtin", "seller"],
        default="builtin",
        help="the page's crowds: built-in only, or mixed with seller-defined predicate and list "
        "crowds (bench.crowd_mix)",
    )
    p.add_argument("--pin", choices=["auto", "off"], default="auto")
    p.add_argument("--no-echo", action="store_true", help="skip the echo baselines")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure the floor: the echo plus the page's HMGET and the canonical log line",
    )
    p.add_argument(
        "--otel",
        choices=list(OTEL_MODES),
        default="off",
        help="tracing of the servers (OTEL_* variables): off, or 1%% / 100%% of the calls "
        "sampled, exported over OTLP/HTTP (batch span processor, the SDK's defaults) to a "
        "receiver in this process on the load generator's CPU",
    )
    p.add_argument("--plot", default="docs/benchmarks/serving.png", help="PNG path ('' = none)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return p


def paced_fractions(args: argparse.Namespace) -> list[float]:
    """``--paced-fractions`` other than 0.7 (which is always measured)."""
    raw = getattr(args, "paced_fractions", "0.7")
    return sorted({float(x) for x in raw.split(",") if x} - {0.7})


def runtimes_of(arg: str | None) -> list[str]:
    """The runtimes ``--runtime`` names (the first is the primary: the top-level figures)."""
    if arg is None:
        from pricing_service.config import Settings  # noqa: PLC0415

        default = Settings.model_fields["server_runtime"].default
        return [os.environ.get("PRICING_SERVER_RUNTIME", default)]
    if arg == "all":
        return list(RUNTIME_MODULES)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIME_MODULES]
    if unknown or not names:
        raise SystemExit(f"--runtime: unknown {unknown or arg!r}; known: {list(RUNTIME_MODULES)}")
    return names


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    runtimes = runtimes_of(args.runtime)
    if args.clients is None:
        args.clients = 4 * args.workers
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    fractions = sorted({*(float(x) for x in args.fractions.split(",") if x), 0.7})
    ncpu = os.cpu_count() or 1
    pin = args.pin == "auto" and args.workers == 1 and ncpu >= 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    result: dict[str, Any] = {}
    redis = RedisServer()
    redis.start()
    # --otel: the spans' destination, a real OTLP/HTTP receiver (decodes every request) on the
    # load generator's CPU, so that the servers pay the real export (encoding, HTTP) and not
    # the receiver's work
    receiver = (
        OtlpReceiver(keep=False, cpus={0} if pin else None).start()
        if OTEL_MODES[args.otel]
        else None
    )
    try:
        if pin and redis.proc is not None:
            subprocess.run(
                ["taskset", "-a", "-pc", "0", str(redis.proc.pid)], check=True, capture_output=True
            )
        result = run(
            args,
            runtimes,
            fractions,
            workdir,
            redis,
            "1" if pin else None,
            "0" if pin else None,
            receiver,
        )
    finally:
        redis.close()
        if receiver is not None:
            receiver.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}")
    print(json.dumps(result, sort_keys=True))


def run(
    args: argparse.Namespace,
    runtimes: list[str],
    fractions: list[float],
    workdir: Path,
    redis: RedisServer,
    server_cpus: str | None,
    client_cpus: str | None,
    receiver: OtlpReceiver | None = None,
) -> dict[str, Any]:
    from pricing_service.config import load_settings  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRICING_", "OTEL_"))}
    env.update(otel_env(args.otel, receiver.endpoint if receiver else None))
    env.update(
        {
            "PRICING_REDIS_URL": redis.url,
            "PRICING_REDIS_NAMESPACE": NAMESPACE,
            "PRICING_RULE_STORE_URL": f"sqlite:///{workdir / 'rules.db'}",
            "PRICING_LOG_FORMAT": "json",
            "PRICING_LOG_LEVEL": "INFO",
        }
    )
    # the runtime's own knobs (PRICING_NATIVE_*) pass through to every server and echo
    env.update({k: v for k, v in os.environ.items() if k.startswith("PRICING_NATIVE_")})
    if args.membership_budget_ms is not None:
        env["PRICING_MEMBERSHIP_BUDGET_MS"] = str(args.membership_budget_ms)
    settings = load_settings(
        redis_url=redis.url,
        redis_namespace=NAMESPACE,
        rule_store_url=f"sqlite:///{workdir / 'rules.db'}",
    )
    harness = Harness(
        workdir, METHOD, args.clients, args.streams, args.duration, args.warmup, client_cpus
    )
    r = Run(args, workdir, redis, harness, env, settings, catalog(), server_cpus)
    load_start = os.getloadavg()[0]  # other work on the host skews every figure: say how much
    prepare(r)
    print(
        f"runtimes {runtimes}, --workers {args.workers}, batch {args.batch}, h2load -c "
        f"{args.clients} -m {args.streams} -D {args.duration:g}s, pinned: {server_cpus is not None}",
        flush=True,
    )
    servers = {rt: measure_server(r, rt, fractions) for rt in runtimes}
    one_worker = {rt: one_worker_peak(r, rt) for rt in runtimes} if args.workers > 1 else {}
    echoes: dict[str, EchoResult] = {}
    if not args.no_echo:
        for rt in dict.fromkeys([REFERENCE_RUNTIME, *runtimes]):
            paced_rate = servers[rt].peak.rps * 0.7 if args.paced and rt in servers else None
            more = {f: p.rps for f, p in servers[rt].paced_more.items()} if rt in servers else {}
            echoes[rt] = measure_echo(r, rt, fractions, paced_rate, more)
    primary = runtimes[0]
    floor_peak = None
    floor_extra: list[str] = []
    if args.floor:
        floor_extra = floor_args(r)
        print(f"floor on {primary} (echo + one HMGET + the log line)", flush=True)
        floor_peak = measure_peak(r, primary, f"floor-{primary}", floor_extra)

    # --rounds: the peaks again, one after the other in every round, so that a host whose speed
    # drifts from minute to minute weighs on all of them alike
    rounds = [_round(servers, echoes, floor_peak)]
    for k in range(1, args.rounds):
        print(f"round {k + 1} of {args.rounds}", flush=True)
        again = {rt: server_peak_again(r, rt, k + 1) for rt in runtimes}
        echo_peaks = {rt: measure_peak(r, rt, f"echo-{rt}-round{k + 1}", []) for rt in echoes}
        fl = measure_peak(r, primary, f"floor-round{k + 1}", floor_extra) if args.floor else None
        rounds.append(_round_of(again, echo_peaks, fl))

    out = summarise(r, runtimes, servers, echoes, one_worker, floor_peak, rounds)
    out["loadavg_start"] = load_start
    out["loadavg_end"] = os.getloadavg()[0]
    out["otel"] = args.otel
    if receiver is not None:  # every server has stopped: their last spans are flushed
        ok = sum(
            s.checks["ok_rpcs"] + s.checks["cancelled_by_h2load_exit"] for s in servers.values()
        )
        out["otel_spans_received"] = receiver.span_count
        out["otel_export_requests"] = receiver.requests
        out["otel_spans_per_rpc"] = round(receiver.span_count / ok, 4) if ok else None
        print(
            f"otel {args.otel}: {receiver.span_count} spans received in {receiver.requests} "
            f"OTLP requests, {out['otel_spans_per_rpc']} per RPC",
            flush=True,
        )
    if args.plot:
        title = (
            f"BatchGetLowestPrice, batch {args.batch}, --workers {args.workers}, "
            f"{os.cpu_count()} cores{' (server pinned to CPU 1)' if server_cpus else ''}"
        )
        curves: dict[str, list[Point]] = {}
        for rt, s in servers.items():
            paced_pts = [*([s.paced] if s.paced else []), *s.paced_more.values()]
            curves[f"server/{rt}"] = [s.peak, *s.points.values(), *paced_pts]
        for rt, e in echoes.items():
            paced = [e.paced_at_server_rate] if e.paced_at_server_rate else []
            curves[f"echo/{rt}"] = [e.peak, *e.points.values(), *paced, *e.paced_more.values()]
        plot(Path(args.plot), title, curves)
        out["plot"] = args.plot
    return out


def otel_env(mode: str, endpoint: str | None) -> dict[str, str]:
    """The servers' ``OTEL_*`` environment of ``--otel mode`` (none for ``off``), exporting to
    the OTLP/HTTP receiver at ``endpoint``."""
    sampler = OTEL_MODES[mode]
    if sampler is None or endpoint is None:
        return {}
    name, arg = sampler
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "bench-serving",
        "OTEL_TRACES_SAMPLER": name,
    }
    if arg:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    return env


def _round(
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


if __name__ == "__main__":
    main()
