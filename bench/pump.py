"""How calls reach the event loop on the native runtime, measured: the open-loop collapse.

pygrpc-native's own asyncio adapter receives calls in a second Python thread and hands each
batch to the event loop with ``call_soon_threadsafe`` (``PRICING_NATIVE_PUMP=thread`` here,
answering each call as soon as it is done). Under open-loop load that server collapsed (issue
13). This benchmark runs each way of feeding the loop on the same data, harness and pinning as
``bench.serving`` (the server on CPU 1; h2load and Redis on CPU 0), one after the other:

* ``thread``: the adapter's design;
* ``loop``: the loop takes ready calls itself whenever it is about to wait, answers a loop
  iteration's calls together, and the thread only wakes an idle loop;
* ``loop+batch``: the same with the runtime's I/O threads on ``SCHED_BATCH`` (the default).

For each: the closed-loop peak, and the 70 % point with paced callers, with what explains the
difference: the server's threads per request (CPU, run-queue wait, context switches, times
preempted), the time calls spent in the server as the pipeline saw it and as the runtime saw it
(the difference is the wait to reach the loop and to leave it), and the Redis round trip.

    python -m bench.pump --duration 10

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness import Harness, pin_running
from bench.serving import Run, measure_server, prepare
from bench.serving_data import METHOD, NAMESPACE, catalog
from pricing_testing.redis_server import RedisServer

VARIANTS: dict[str, dict[str, str]] = {
    "thread": {"PRICING_NATIVE_PUMP": "thread", "PRICING_NATIVE_IO_POLICY": "normal"},
    "loop": {"PRICING_NATIVE_PUMP": "loop", "PRICING_NATIVE_IO_POLICY": "normal"},
    "loop+batch": {"PRICING_NATIVE_PUMP": "loop", "PRICING_NATIVE_IO_POLICY": "batch"},
    "thread+batch": {"PRICING_NATIVE_PUMP": "thread", "PRICING_NATIVE_IO_POLICY": "batch"},
}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pump", description=__doc__)
    p.add_argument("--variants", default="thread,loop,loop+batch", help=f"of {list(VARIANTS)}")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="every variant again, N times")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    args = argparse.Namespace(
        workers=1, batch=20, paced=True, scaling_batch=0, membership_budget_ms=None
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-pump-"))
    redis = RedisServer()
    redis.start()
    results: list[dict[str, Any]] = []
    try:
        assert redis.proc is not None
        pin_running(redis.proc.pid, "0")
        from pricing_service.config import load_settings  # noqa: PLC0415

        env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
        env.update({
            "PRICING_REDIS_URL": redis.url,
            "PRICING_REDIS_NAMESPACE": NAMESPACE,
            "PRICING_RULE_STORE_URL": f"sqlite:///{workdir / 'rules.db'}",
            "PRICING_LOG_FORMAT": "json",
        })  # fmt: skip
        settings = load_settings(
            redis_url=redis.url,
            redis_namespace=NAMESPACE,
            rule_store_url=f"sqlite:///{workdir / 'rules.db'}",
        )
        harness = Harness(workdir, METHOD, 4, 4, a.duration, a.warmup, "0")
        run = Run(args, workdir, redis, harness, env, settings, catalog(), "1")
        prepare(run)
        for r in range(a.rounds):
            for name in variants:
                variant = dataclasses.replace(run, env={**env, **VARIANTS[name]})
                s = measure_server(variant, "native", [], label=f"{name}-{r + 1}")
                assert s.paced is not None
                results.append({
                    "variant": name,
                    "round": r + 1,
                    "peak": asdict(s.peak),
                    "paced70": asdict(s.paced),
                    "checks": s.checks,
                })  # fmt: skip
    finally:
        redis.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print("variant        peak rps  cpu/req | paced70 rps   p50    p99  in-server p99 "
          "runtime p99 | loop cpu/req preempted/req | other threads switches/req")  # fmt: skip
    for res in results:
        pk, pc = res["peak"], res["paced70"]
        loop = pc["threads"].get("loop", {})
        others = {k: v["switches"] for k, v in pc["threads"].items() if k != "loop"}
        print(
            f"{res['variant']:12} {pk['rps']:9.0f} {pk['server_cpu_us_per_req']:7.0f}  | "
            f"{pc['rps']:9.0f} {pc['p50_ms']:6.2f} {pc['p99_ms']:6.2f} "
            f"{pc['rpc_p99_ms']!s:>12} {pc['runtime_p99_ms']!s:>11} | "
            f"{loop.get('cpu_us', 0):8.0f} {loop.get('preempted', 0):10.2f}      | {others}"
        )
    print(json.dumps({"bench": "pump", "results": results, "problems": run.problems}))


if __name__ == "__main__":
    main()
