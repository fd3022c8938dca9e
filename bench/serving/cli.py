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
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import pin_running
from bench.serving.echo import measure_echoes, measure_floor
from bench.serving.prepare import new_run, prepare
from bench.serving.report import otel_figures, plot_run, summarise
from bench.serving.rounds import first_round, more_rounds
from bench.serving.server import measure_server, one_worker_peak
from bench.serving.state import OTEL_MODES
from pricing_service.runtime import RUNTIME_MODULES
from pricing_testing.otlp import OtlpReceiver
from pricing_testing.redis_server import RedisServer


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
            pin_running(redis.proc.pid, "0")
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
    """The phases one after the other; the JSON object's figures."""
    r = new_run(args, workdir, redis, server_cpus, client_cpus, receiver)
    load_start = os.getloadavg()[0]  # other work on the host skews every figure: say how much
    prepare(r)
    print(
        f"runtimes {runtimes}, --workers {args.workers}, batch {args.batch}, h2load -c "
        f"{args.clients} -m {args.streams} -D {args.duration:g}s, pinned: {server_cpus is not None}",
        flush=True,
    )
    servers = {rt: measure_server(r, rt, fractions) for rt in runtimes}
    one_worker = {rt: one_worker_peak(r, rt) for rt in runtimes} if args.workers > 1 else {}
    echoes = {} if args.no_echo else measure_echoes(r, runtimes, servers, fractions)
    floor_peak, floor_extra = measure_floor(r, runtimes[0]) if args.floor else (None, [])
    rounds = [
        first_round(servers, echoes, floor_peak),
        *more_rounds(r, runtimes, echoes, floor_extra),
    ]

    out = summarise(r, runtimes, servers, echoes, one_worker, floor_peak, rounds)
    out["loadavg_start"] = load_start
    out["loadavg_end"] = os.getloadavg()[0]
    out["otel"] = args.otel
    if receiver is not None:
        out.update(otel_figures(args.otel, receiver, servers))
    if args.plot:
        plot_run(r, servers, echoes)
        out["plot"] = args.plot
    return out
