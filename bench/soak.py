"""Soak: the whole system under mixed traffic for N minutes; errors, p99 and RSS per minute.

    python -m bench.soak --minutes 2

Starts its own private redis-server (AOF everysec), a SQLite rule store, ``pricing-service
serve`` and ``sync-worker consume``, then for N minutes runs the load of the fault suite
(pricing_testing/load/): BatchGetLowestPrice pages, CheckDiscountStrict checks, admin rule
upserts, follow/unfollow/purchase events on the stream, unfollows of fans spread over the run,
and once a minute a snapshot load (``sync-worker load-snapshot``, 20k rows). Every answer is
checked against the load's model as it comes (violations are counted), and at the end the
final state is compared with the model (membership records, pending entries, dead letters,
acknowledged rules).

Per minute it prints: calls and error counts by method and code, p50/p99 latency per method,
degraded answers, and the RSS (VmRSS) of the server, the worker and Redis. RSS must stay flat:
``rss_growth_pct`` compares the last minute with the first. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import percentile, rss_kb
from pricing_testing.load import Call, Load, LoadConfig, Population
from pricing_testing.procs import (
    pricing_service,
    run_sync_worker,
    service_env,
    sync_worker,
    wait_serving,
)
from pricing_testing.redis_server import RedisServer
from sync_worker.snapshot_gen import SnapshotRow, write_snapshot

SNAPSHOT_ROWS = 20_000


def minute_stats(calls: list[Call]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in sorted({c.method for c in calls}):
        mine = [c for c in calls if c.method == method]
        lat = [c.latency_ms for c in mine]
        out[method] = {
            "calls": len(mine),
            "errors": dict(Counter(c.code for c in mine if c.code != "OK")),
            "p50_ms": round(percentile(lat, 50), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "degraded": sum(c.degraded for c in mine),
        }
    return out


async def soak(
    minutes: float, tmp: Path, seed: int, rule_index_max_items: int | None = None
) -> dict[str, Any]:
    redis = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"]).start()
    ns = "soak:"
    env = service_env(
        redis_url=redis.url,
        namespace=ns,
        tmp=tmp,
        extra={
            "PRICING_LOG_LEVEL": "WARNING",
            "PRICING_MEMBERSHIP_BUDGET_MS": "200",
            **(
                {"PRICING_RULE_INDEX_MAX_ITEMS": str(rule_index_max_items)}
                if rule_index_max_items
                else {}
            ),
        },
    )
    server = pricing_service(env, tmp / "server.log")
    worker = None
    load = None
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        worker = sync_worker(env, tmp / "worker.log", "consume")
        duration_s = minutes * 60
        cfg = LoadConfig(
            strict_max_lag_ms=2000,
            call_pause_s=0.002,
            unfollow_spread_s=max(duration_s * 0.8, 1.0),
            admin_interval_s=0.5,
        )
        load = Load(
            target=env["PRICING_LISTEN"],
            redis_url=redis.url,
            namespace=ns,
            events_stream=env["PRICING_EVENTS_STREAM"],
            consumer_group=env["PRICING_CONSUMER_GROUP"],
            dead_letter_stream=env["PRICING_DEAD_LETTER_STREAM"],
            population=Population.make("s", fans=50, churn=100, streamers=500, strangers=50),
            config=cfg,
            seed=seed,
        )
        await load.seed_state()
        await load.wait_strict_ready()
        procs = {"server": server.proc.pid, "worker": worker.proc.pid}
        assert redis.proc is not None
        procs["redis"] = redis.proc.pid
        rss0 = {k: rss_kb(p) for k, p in procs.items()}
        print(f"start RSS kB {rss0}", flush=True)
        load.start()
        t0 = time.time() * 1000
        rows: list[dict[str, Any]] = []
        minute = 0
        while (time.time() * 1000 - t0) < duration_s * 1000:
            start_ms = t0 + minute * 60_000
            snap = await asyncio.to_thread(_snapshot_load, env, tmp, minute)
            end_ms = min(start_ms + 60_000, t0 + duration_s * 1000)
            await asyncio.sleep(max(end_ms - time.time() * 1000, 0) / 1000)
            row = {
                "minute": minute + 1,
                "rpc": minute_stats(load.calls_between_all(start_ms, end_ms)),
                "rss_kb": {k: rss_kb(p) for k, p in procs.items()},
                "snapshot_load_s": snap,
                "violations_so_far": len(load.violations),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            minute += 1
        await load.stop(timeout_s=120)
        final = await load.check_final_state()
        first, last = rows[0]["rss_kb"], rows[-1]["rss_kb"]
        growth = {k: round(100 * (last[k] - first[k]) / max(first[k], 1), 1) for k in first}
        totals = load.summary()
        return {
            "bench": "soak",
            "minutes": minutes,
            "per_minute": rows,
            "rss_start_kb": rss0,
            "rss_growth_pct": growth,
            "violations": len(load.violations),
            "violation_kinds": dict(Counter(v.what for v in load.violations)),
            "calls": totals["calls"],
            "events_acked": totals["events_acked"],
            "rules_acked": totals["rules_acked"],
            "final_state_matches_model": True,
            "stream": final["stream"],
        }
    finally:
        if load is not None:
            await load.close()
        codes = {"server": server.terminate()}
        if worker is not None:
            codes["worker"] = worker.terminate()
        redis.close()
        print(f"exit codes {codes}", file=sys.stderr)


def _snapshot_load(env: dict[str, str], tmp: Path, minute: int) -> float:
    """Write and load a snapshot of SNAPSHOT_ROWS follow relations (new buyers each minute)."""
    cut = int(time.time() * 1000) - 60_000
    rows = (
        SnapshotRow(f"snap{minute}-{i}", str(300 + i % 100), cut - i * 1000, i % 3)
        for i in range(SNAPSHOT_ROWS)
    )
    d = tmp / f"snapshot-{minute}"
    write_snapshot(d, rows, cut, part_rows=10_000)
    t = time.monotonic()
    done = run_sync_worker(env, "load-snapshot", str(d))
    took = time.monotonic() - t
    if done.returncode != 0:
        raise RuntimeError(f"snapshot load failed: {done.stdout}{done.stderr}")
    shutil.rmtree(d, ignore_errors=True)
    return round(took, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument(
        "--rule-index-max-items",
        type=int,
        default=None,
        help="PRICING_RULE_INDEX_MAX_ITEMS of the server: small values keep the bounded index "
        "missing and evicting on every page",
    )
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        result = asyncio.run(soak(args.minutes, tmp, args.seed, args.rule_index_max_items))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs in {tmp}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
