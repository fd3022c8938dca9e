"""Rule store benchmark: write throughput and change-feed propagation delay.

    python -m bench.rules --store sqlite|postgresql [--writes 2000] [--duration 20] [--rate 25]

1. Throughput: ``--writes`` single-rule upserts, one transaction each, from one writer
   (``writes_per_s``), then the same number of rules in batches of 500 (``batch_rules_per_s``).
2. Propagation: a second OS process runs a :class:`RuleIndex` over the same store with the
   default refresh settings (``PRICING_RULE_REFRESH_INTERVAL_MS``, default 200) and reports
   when each revision becomes visible in its index; this process writes at ``--rate`` writes/s
   for ``--duration`` seconds and records when each commit returned. Delay = visible - committed
   (same host, same wall clock).

The store is a SQLite file in a temporary directory, or a fresh schema in the PostgreSQL
database ``--pg-url`` (default ``$PRICING_TEST_PG_URL`` or postgresql://postgres@127.0.0.1:5432/test),
dropped afterwards. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.harness import percentile
from pricing_service.config import load_settings
from pricing_service.domain import CrowdKind, Money, Rule, SystemClock
from pricing_service.logging import configure_logging
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.index import RuleIndex
from pricing_service.rules.store import RuleChange
from pricing_testing.rule_stores import pg_schema, sqlite_url

DEFAULT_PG = os.environ.get("PRICING_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
TARGET_P99_MS = 1000.0
KINDS = (CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS)


@contextlib.contextmanager
def store_location(kind: str, pg_url: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-rules-") as d:
            yield sqlite_url(Path(d))
        return
    with pg_schema(pg_url, prefix="bench_rules_") as url:
        yield url


def rule(n: int, amount: int) -> Rule:
    item = n // 3  # three crowds per item, all of the item's seller
    return Rule("", f"seller-{item % 50}", f"item-{item}", KINDS[n % 3], Money("CNY", amount))


# --- the follower process -------------------------------------------------------------------


async def follow(url: str) -> None:
    """Child: print ``<revision> <unix ns>`` for every change as it lands in the index."""
    settings = load_settings(rule_store_url=url)  # refresh interval from the environment
    configure_logging("WARNING", "json")  # logs to stderr; stdout carries the protocol
    store = await open_rule_store(settings, migrate=False)
    out = sys.stdout

    def seen(changes: Sequence[RuleChange]) -> None:
        now = time.time_ns()
        out.write("".join(f"@seen {c.revision} {now}\n" for c in changes))
        out.flush()

    index = RuleIndex(store, settings, SystemClock(), on_change=seen)
    async with index:
        print(f"@ready {index.revision} {settings.rule_refresh_interval_ms}", flush=True)
        await asyncio.Event().wait()  # until killed


# --- the writer (this process) --------------------------------------------------------------


async def throughput(url: str, writes: int) -> tuple[float, float]:
    store = await open_rule_store(load_settings(rule_store_url=url))
    try:
        start = time.perf_counter()
        for n in range(writes):
            await store.upsert(rule(n, 1000 + n), "bench")
        single = writes / (time.perf_counter() - start)
        start = time.perf_counter()
        for base in range(0, writes, 500):
            await store.upsert_many(
                [rule(n, 5000 + n) for n in range(base, min(base + 500, writes))], "bench"
            )
        batched = writes / (time.perf_counter() - start)
    finally:
        await store.close()
    return single, batched


async def propagation(
    url: str, duration_s: float, rate: float, first_item: int
) -> tuple[list[float], int]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.rules", "--follower", url,
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert child.stdout is not None
    visible: dict[int, int] = {}
    ready = asyncio.get_running_loop().create_future()
    caught_up = asyncio.Event()
    last_written = [0]

    async def read() -> None:
        assert child.stdout is not None
        async for raw in child.stdout:
            parts = raw.decode().split()
            if not parts or not parts[0].startswith("@"):
                continue  # the child's log lines
            if parts[0] == "@ready":
                ready.set_result(int(parts[2]))
            else:
                revision = int(parts[1])
                visible.setdefault(revision, int(parts[2]))
                if last_written[0] and revision >= last_written[0]:
                    caught_up.set()

    reader = asyncio.create_task(read())
    store = await open_rule_store(load_settings(rule_store_url=url), migrate=False)
    committed: dict[int, int] = {}
    try:
        interval_ms = await asyncio.wait_for(ready, 60)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        while loop.time() - t0 < duration_s:
            target = t0 + n / rate
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            written, _ = await store.upsert(rule(first_item + n, 100 + n), "bench")
            committed[written.revision] = time.time_ns()
            n += 1
        last_written[0] = max(committed)
        if last_written[0] in visible:
            caught_up.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(caught_up.wait(), 10)
    finally:
        await store.close()
        child.kill()
        await child.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    missing = [r for r in committed if r not in visible]
    if missing:
        print(f"WARNING: {len(missing)} writes never became visible", file=sys.stderr)
    delays = [(visible[r] - t) / 1e6 for r, t in committed.items() if r in visible]
    return delays, interval_ms


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    with store_location(args.store, args.pg_url) as url:
        single, batched = await throughput(url, args.writes)
        print(f"writes: {single:,.0f} single-rule upserts/s (one transaction each, one writer)")
        print(f"        {batched:,.0f} rules/s in batches of 500 (one transaction per batch)")
        delays, interval = await propagation(url, args.duration, args.rate, 3 * args.writes)
    p50, p99 = percentile(delays, 50), percentile(delays, 99)
    print(
        f"propagation over {len(delays)} writes at {args.rate:g}/s, refresh interval {interval} ms:"
        f" p50 {p50:.1f} ms, p90 {percentile(delays, 90):.1f} ms, p99 {p99:.1f} ms,"
        f" max {max(delays):.1f} ms, mean {statistics.fmean(delays):.1f} ms"
    )
    print(f"target p99 <= {TARGET_P99_MS:.0f} ms: {'met' if p99 <= TARGET_P99_MS else 'MISSED'}")
    return {
        "bench": "rules",
        "store": args.store,
        "writes_per_s": round(single, 1),
        "batch_rules_per_s": round(batched, 1),
        "propagation_p50_ms": round(p50, 2),
        "propagation_p90_ms": round(percentile(delays, 90), 2),
        "propagation_p99_ms": round(p99, 2),
        "propagation_max_ms": round(max(delays), 2),
        "samples": len(delays),
        "refresh_interval_ms": interval,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": p99 <= TARGET_P99_MS,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rules", description=__doc__.split("\n")[0])
    p.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--pg-url", default=DEFAULT_PG)
    p.add_argument("--writes", type=int, default=2000, help="writes of the throughput phase")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of paced writes")
    p.add_argument("--rate", type=float, default=25.0, help="paced writes per second")
    p.add_argument("--follower", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.follower:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(follow(args.follower))
        return
    result = asyncio.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
