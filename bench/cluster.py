"""Redis Cluster vs one Redis: page lookups, event consumption with WAIT and partitions.

    python -m bench.cluster [--seconds 5] [--events 30000] [--buyers 20000]

Starts a private redis-server and a private local cluster (3 masters + 3 replicas,
``pricing_testing.redis_cluster``); never touches the shared Redis. In-process, one Python
process (one core at most):

1. lookups: ``MembershipStore.member_crowds`` (one HMGET of 10 crowds per page, the
   BatchGetLowestPrice lookup) from 64 concurrent tasks for ``--seconds``; pages/s, p50/p99,
   and Python CPU per lookup, standalone vs cluster.
2. events: ``--events`` relation events published first, then drained by the real consumer
   classes; events/s from first read to "nothing pending": standalone single stream; cluster
   single stream with WAIT (``redis_wait_replicas=1``) and without; cluster with 4 partitions
   (``PartitionedConsumer``) with WAIT.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from typing import Any

from bench.harness import percentile, self_cpu_seconds
from pricing_service.config import Settings, load_settings
from pricing_service.domain import Crowd, CrowdKind, SystemClock
from pricing_service.membership import derive
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import make_redis
from pricing_testing.redis_cluster import RedisCluster
from pricing_testing.redis_server import RedisServer
from sync_worker.consumer import StreamConsumer
from sync_worker.events import make_event
from sync_worker.partitions import PartitionedConsumer, PartitionedPublisher

TTLS = derive.Ttls.from_seconds(48 * 3600, 48 * 3600, 30)


async def seed(store: MembershipStore, buyers: int) -> None:
    now = time.time_ns() // 1_000_000 - 60_000
    rng = random.Random(1)
    batch: list[derive.MembershipWrite] = []
    for b in range(buyers):
        for s in rng.sample(range(1, 200), 5):
            batch.extend(derive.follow(f"buyer{b}", str(s), now, TTLS))
        if len(batch) > 5000:
            await store.apply(batch)
            batch = []
    await store.apply(batch)


async def lookups(settings: Settings, buyers: int, seconds: float) -> dict[str, float]:
    client = make_redis(settings)
    store = MembershipStore(client, MembershipLayout(settings.redis_namespace), SystemClock())
    await seed(store, buyers)
    crowds = [Crowd(str(s), CrowdKind.ALL_FANS) for s in range(1, 11)]
    lat: list[float] = []
    done = 0
    stop = time.monotonic() + seconds

    async def worker(seed_: int) -> None:
        nonlocal done
        rng = random.Random(seed_)
        while time.monotonic() < stop:
            user = f"buyer{rng.randrange(buyers)}"
            t = time.perf_counter()
            await store.member_crowds(user, crowds)
            lat.append(time.perf_counter() - t)
            done += 1

    c0, t0 = self_cpu_seconds(), time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(64)))
    wall, cpu = time.monotonic() - t0, self_cpu_seconds() - c0
    await client.aclose()
    return {
        "pages_per_s": round(done / wall),
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
        "python_cpu_us_per_page": round(cpu / max(done, 1) * 1e6, 1),
    }


async def drain(settings: Settings, events: int) -> dict[str, Any]:
    client = make_redis(settings)
    pub = PartitionedPublisher(client, settings.events_stream, settings.event_partitions)
    now = time.time_ns() // 1_000_000 - 60_000
    rng = random.Random(2)
    evs = [
        make_event(
            "follow" if rng.random() < 0.7 else "unfollow",
            f"eb{rng.randrange(50_000)}",
            str(rng.randrange(1, 500)),
            now + i,
        )
        for i in range(events)
    ]
    for i in range(0, events, 5000):
        await pub.publish(evs[i : i + 5000], validate=False)
    consumer: StreamConsumer | PartitionedConsumer
    if settings.event_partitions > 1:
        consumer = PartitionedConsumer(settings, consumer_name="bench")
        loops = consumer.consumers
    else:
        consumer = StreamConsumer(settings, consumer_name="bench")
        loops = [consumer]
    c0, t0 = self_cpu_seconds(), time.monotonic()
    task = asyncio.create_task(consumer.run())
    while sum(c.stats.entries for c in loops) < events:
        await asyncio.sleep(0.02)
        if task.done():
            task.result()
    wall, cpu = time.monotonic() - t0, self_cpu_seconds() - c0
    consumer.shutdown()
    await task
    await consumer.redis.aclose()
    await client.aclose()
    return {
        "events_per_s": round(events / wall),
        "python_cpu_us_per_event": round(cpu / events * 1e6, 1),
        "replication_unprotected": sum(c.stats.replication_unprotected for c in loops),
        "replication_wait_short": sum(c.stats.replication_wait_short for c in loops),
        "batches": sum(c.stats.batches for c in loops),
    }


def settings_for(url: str, ns: str, **kw: Any) -> Settings:
    return load_settings(
        redis_url=url,
        redis_namespace=ns,
        events_stream=f"{ns}events",
        dead_letter_stream=f"{ns}dead",
        consumer_group=f"{ns}g",
        stream_block_ms=100,
        redis_socket_timeout_ms=10_000,  # a shared, loaded 2-core machine
        **kw,
    )


async def run(args: argparse.Namespace, standalone_url: str, cluster_url: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, url in (("standalone", standalone_url), ("cluster", cluster_url)):
        r = await lookups(settings_for(url, f"lk{name}:"), args.buyers, args.seconds)
        out[f"lookups_{name}"] = r
        print(f"lookups {name:10s}: {r}", flush=True)
    cases = [
        ("standalone_1", standalone_url, {"event_partitions": 1}),
        ("cluster_1_nowait", cluster_url, {"event_partitions": 1, "redis_wait_replicas": 0}),
        ("cluster_1_wait", cluster_url, {"event_partitions": 1}),
        ("cluster_4_wait", cluster_url, {"event_partitions": 4}),
    ]
    for name, url, kw in cases:
        r = await drain(settings_for(url, f"ev{name}:", **kw), args.events)
        out[f"events_{name}"] = r
        print(f"events {name:18s}: {r}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--buyers", type=int, default=20_000)
    args = p.parse_args()
    server = RedisServer(extra_args=["--hash-max-listpack-entries", "1024"]).start()
    cluster = RedisCluster().start()
    try:
        out = asyncio.run(run(args, server.url, cluster.url))
    finally:
        cluster.close()
        server.close()
    out.update(
        {
            "bench": "cluster",
            "cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "seconds": args.seconds,
            "events": args.events,
            "buyers": args.buyers,
        }
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
