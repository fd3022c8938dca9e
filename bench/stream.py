"""Stream consumer throughput and publish-to-visible latency, through ``sync-worker consume``.

    python -m bench.stream [--events 200000] [--rate 5000] [--seconds 10]
                           [--partitions 1] [--workers 1]

1. Sustained throughput: ``--events`` relation events (70% follow, 30% unfollow, 100k buyers)
   are published to a private redis-server first, each to its buyer's partition as the real
   producer does (``PartitionedPublisher``; ``--partitions 1``: the one stream); then
   ``--workers`` ``sync-worker consume`` subprocesses (``PRICING_EVENT_PARTITIONS``, default
   settings: batch 500; each reads every partition as a member of the one group) drain them.
   Rate = entries consumed / time from the first entry read to "every partition fully read,
   nothing pending, no backlog". Consumer CPU is summed over the workers, each counted from
   the first entry read or, if later, from its first read of the group (its start-up is not
   counted).
2. Visibility: with the consumers running, events are published (to their partitions) at
   ``--rate`` events/s for ``--seconds``; for one event of every publish call (every 10 ms)
   the bench polls Redis until the membership is visible: latency = first visible - XADD
   acknowledged. The watermark lag (Redis TIME - watermark, the minimum over the partitions)
   is sampled at the same time.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.harness import cpu_seconds, percentile, redis_cpu_seconds
from pricing_service.membership.layout import MembershipLayout
from pricing_testing.redis_server import RedisServer
from sync_worker.events import FOLLOW, UNFOLLOW, make_event
from sync_worker.partitions import PartitionedPublisher

NS = "bench:"
STREAM = f"{NS}events"
GROUP = "pricing-sync"  # the consumers' default PRICING_CONSUMER_GROUP
ROOT = Path(__file__).resolve().parents[1]


async def redis_cpu_s(r: aioredis.Redis) -> float:
    info: Any = await r.info("cpu")
    return redis_cpu_seconds(info)


def start_consumer(url: str, partitions: int, name: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
    env.update(
        {
            "PRICING_REDIS_URL": url,
            "PRICING_REDIS_NAMESPACE": NS,
            "PRICING_EVENTS_STREAM": STREAM,
            "PRICING_DEAD_LETTER_STREAM": f"{NS}dead",
            "PRICING_EVENT_PARTITIONS": str(partitions),
            "PRICING_CONSUMER_NAME": name,
            "PRICING_LOG_FORMAT": "json",
            "PRICING_LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "sync_worker", "consume"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def command_usec(r: aioredis.Redis) -> dict[str, tuple[int, int]]:
    """``INFO commandstats``: command -> (calls, usec) so far."""
    info: Any = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


async def group_state(r: aioredis.Redis, stream: str) -> tuple[int, int, int]:
    """(entries read by the group, pending, backlog) of one stream."""
    if not await r.exists(stream):
        return 0, 0, 0
    groups: Any = await r.xinfo_groups(stream)
    if not groups:
        return 0, 0, 0
    g = groups[0]
    return int(g.get("entries-read") or 0), int(g["pending"]), int(g.get("lag") or 0)


async def group_members(r: aioredis.Redis, streams: Sequence[str]) -> set[str]:
    """Consumer names that have read (or claimed) from any of ``streams``."""
    names: set[str] = set()
    for stream in streams:
        try:
            consumers: Any = await r.xinfo_consumers(stream, GROUP)
        except aioredis.ResponseError:  # NOGROUP: no worker has reached this partition yet
            continue
        for c in consumers:
            name = c["name"]
            names.add(name.decode() if isinstance(name, bytes) else str(name))
    return names


#: the least time the throughput run waits for the consumers to drain the streams
STALL_MIN_S = 120.0


async def throughput(url: str, n: int, partitions: int, workers: int) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url, socket_timeout=30)
    pub = PartitionedPublisher(r, STREAM, partitions, chunk=2000)
    rng = random.Random(1)
    now = time.time_ns() // 1_000_000
    t = time.perf_counter()
    for i in range(0, n, 10_000):
        evs = [
            make_event(
                FOLLOW if rng.random() < 0.7 else UNFOLLOW,
                f"t{rng.randrange(100_000)}",
                str(rng.randrange(1, 5000)),
                now - rng.randrange(600_000),
                event_id=str(i + k),
            )
            for k in range(min(10_000, n - i))
        ]
        await pub.publish(evs, validate=False)
    streams = pub.streams
    sizes = [int(await r.xlen(s)) for s in streams]
    print(
        f"published {n:,} events to {len(streams)} stream(s) {sizes}"
        f" in {time.perf_counter() - t:.1f}s (not measured)"
    )
    procs = {
        name: start_consumer(url, partitions, name)
        for name in (f"bench-{i}" for i in range(workers))
    }
    try:
        t_first = None
        read_first = 0
        cpu0: dict[str, float] = {}  # per worker: CPU at the start of its measured interval
        # a stalled consumer must end the run, not hang it (~20,000 events/s is typical)
        deadline = time.perf_counter() + max(STALL_MIN_S, n / 2_000)
        while True:
            states = [await group_state(r, s) for s in streams]
            read = sum(st[0] for st in states)
            now_p = time.perf_counter()
            if now_p > deadline:
                raise RuntimeError(
                    f"the consumers read {read:,} of {n:,} events before the deadline "
                    f"({max(STALL_MIN_S, n / 2_000):.0f} s): stalled"
                )
            if t_first is None and read > 0:
                t_first, read_first = now_p, read
                rcpu0 = await redis_cpu_s(r)
                stats0 = await command_usec(r)
            if t_first is not None and len(cpu0) < workers:
                for name in await group_members(r, streams) - cpu0.keys():
                    cpu0[name] = cpu_seconds([procs[name].pid])
            if all(
                got >= size and pending == 0 and lag == 0
                for (got, pending, lag), size in zip(states, sizes, strict=True)
            ):
                t_end = now_p
                # a worker that never read in the interval counts 0 (its start-up is excluded)
                cpu_s = sum(
                    cpu_seconds([p.pid]) - cpu0.get(name, cpu_seconds([p.pid]))
                    for name, p in procs.items()
                )
                cpu_us = cpu_s / max(n - read_first, 1) * 1e6
                rcpu_us = (await redis_cpu_s(r) - rcpu0) / max(n - read_first, 1) * 1e6
                stats1 = await command_usec(r)
                break
            for p in procs.values():
                if p.poll() is not None:
                    raise RuntimeError(f"consumer {p.pid} exited with {p.returncode}")
            await asyncio.sleep(0.01)
        assert t_first is not None
        rate = (n - read_first) / max(t_end - t_first, 1e-9)
        print(
            f"consumed {n - read_first:,} events in {t_end - t_first:.2f}s = {rate:,.0f} events/s"
            f" ({workers} worker(s), {partitions} partition(s)); CPU per event: consumers"
            f" {cpu_us:.1f} us, redis {rcpu_us:.1f} us"
        )
        # where Redis spends its time (commandstats; the bench's own polling included)
        per_event: dict[str, float] = {}
        for cmd, (calls, usec) in stats1.items():
            c0, u0 = stats0.get(cmd, (0, 0))
            if usec - u0 > 0:
                per_event[cmd] = (usec - u0) / max(n - read_first, 1)
                print(
                    f"  redis {cmd}: {calls - c0:,} calls, {(usec - u0) / max(calls - c0, 1):.1f}"
                    f" us/call, {per_event[cmd]:.2f} us/event"
                )
        # start the latency phase only once the watermark has caught up too
        last_ms = 0
        for stream in streams:
            last: Any = await r.xrevrange(stream, count=1)
            if last:
                last_ms = max(last_ms, int(last[0][0].split(b"-")[0]))
        wm_key = MembershipLayout(NS).watermark_key
        for _ in range(3000):  # polling another process's progress
            if int(await r.get(wm_key) or 0) > last_ms:
                break
            await asyncio.sleep(0.01)
        return {
            "events_per_s": round(rate),
            "throughput_events": n,
            "consumer_cpu_us_per_event": round(cpu_us, 1),
            "redis_cpu_us_per_event": round(rcpu_us, 1),
            "redis_command_us_per_event": {k: round(v, 2) for k, v in per_event.items()},
            "procs": list(procs.values()),
            "redis": r,
        }
    except BaseException:
        for p in procs.values():
            p.kill()
        raise


async def visibility(url: str, rate: int, seconds: float, partitions: int) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url, socket_timeout=10)
    check = aioredis.Redis.from_url(url, socket_timeout=10)
    layout = MembershipLayout(NS)
    pub = PartitionedPublisher(r, STREAM, partitions)
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    waiting: dict[str, float] = {}
    latencies: list[float] = []
    lags: list[int] = []
    stop = asyncio.Event()
    sent = 0

    async def publisher() -> None:
        nonlocal sent
        start = time.perf_counter()
        k = 0
        while time.perf_counter() - start < seconds:
            now = time.time_ns() // 1_000_000
            evs = [
                make_event(FOLLOW, f"v{k}-{j}", "7", now, event_id=f"{k}-{j}")
                for j in range(per_tick)
            ]
            await pub.publish(evs, validate=False)
            waiting[layout.user_key(f"v{k}-0")] = time.perf_counter()
            sent += per_tick
            k += 1
            target = start + k * tick  # hold the rate, catching up after a slow call
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        stop.set()

    async def checker() -> None:
        while not stop.is_set() or waiting:
            keys = list(waiting)
            if keys:
                pipe = check.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(key)
                seen = await pipe.execute()
                t = time.perf_counter()
                for key, ok in zip(keys, seen, strict=True):
                    if ok:
                        latencies.append((t - waiting.pop(key)) * 1000)
            await asyncio.sleep(0.001)

    async def lag_sampler() -> None:
        while not stop.is_set():
            raw = await check.get(layout.watermark_key)
            secs, micros = await check.time()
            if raw is not None:
                lags.append(int(secs) * 1000 + int(micros) // 1000 - int(raw))
            await asyncio.sleep(0.05)

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(publisher(), checker(), lag_sampler()), seconds + 60)
    achieved = sent / (time.perf_counter() - t0)
    await r.aclose()
    await check.aclose()
    print(
        f"visibility at {achieved:,.0f} events/s offered ({len(latencies)} samples): "
        f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
        f"max {max(latencies):.1f} ms; watermark lag p50 {percentile(lags, 50):.0f} ms, "
        f"p99 {percentile(lags, 99):.0f} ms"
    )
    return {
        "visibility_p50_ms": round(percentile(latencies, 50), 1),
        "visibility_p99_ms": round(percentile(latencies, 99), 1),
        "visibility_max_ms": round(max(latencies), 1),
        "visibility_samples": len(latencies),
        "offered_events_per_s": round(achieved),
        "watermark_lag_p50_ms": percentile([float(x) for x in lags], 50),
        "watermark_lag_p99_ms": percentile([float(x) for x in lags], 99),
    }


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    tp = await throughput(url, args.events, args.partitions, args.workers)
    procs: list[subprocess.Popen[bytes]] = tp.pop("procs")
    await tp.pop("redis").aclose()
    try:
        vis = await visibility(url, args.rate, args.seconds, args.partitions)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in procs]
    return {
        **tp,
        **vis,
        "consumer_exit_code": next((c for c in codes if c != 0), 0),
        "consumer_exit_codes": codes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--partitions", type=int, default=1, help="PRICING_EVENT_PARTITIONS (1: one stream)"
    )
    ap.add_argument(
        "--workers", type=int, default=1, help="sync-worker consume processes in the group"
    )
    args = ap.parse_args()
    server = RedisServer().start()
    try:
        result = asyncio.run(run(args, server.url))
    finally:
        server.close()
    result.update(
        {
            "rate_target": args.rate,
            "partitions": args.partitions,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
