"""The whole system on a real Redis Cluster (3 masters + 3 replicas), through its processes.

``pricing-service`` and two ``sync-worker consume`` processes get a ``redis+cluster://`` URL
and four event partitions; two ``sync-worker load-snapshot`` processes split a two-part
snapshot. Then, while relation events are published and prices read without pause: a
resharding (slots with live keys move), a graceful failover, and ``kill -9`` of a master. At
the end every buyer's price matches the last event published for them, the watermark covers
every event, checkout answers strictly again, and no process failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import redis

from pricing.v1 import (
    common_pb2,
    events_pb2,
    pricing_pb2,
    pricing_pb2_grpc,
)
from pricing_service.config import load_settings
from pricing_service.membership.layout import MembershipLayout
from pricing_service.redis_client import make_redis
from pricing_service.redis_errors import TRANSIENT_ERRORS
from pricing_service.replica_acks import ReplicaAcks
from pricing_testing.procs import (
    Proc,
    pricing_service,
    run_sync_worker,
    service_env,
    sync_worker,
    wait_serving,
)
from pricing_testing.redis_cluster import RedisCluster, keyslot
from pricing_testing.rule_stores import pg_schema
from sync_worker.events import make_event
from sync_worker.partitions import PartitionedPublisher, partition_of
from tests.support.clusters import running_cluster
from tests.support.rpcs import strict_verdict, upsert_fan_rule

# every test starts a server: on each server runtime (tests.conftest.server_runtime)
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_runtime")]
PARTITIONS = 4
BUYERS = [f"b{i}" for i in range(60)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with running_cluster() as c:
        yield c


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def write_snapshot(directory: Path, cut: datetime, fans: list[str]) -> None:
    """Two parts: the fans of seller 42 split between them."""
    directory.mkdir()
    files = []
    for part in range(2):
        name = f"part-{part:05d}.csv"
        files.append(name)
        with (directory / name).open("w") as f:
            f.write("user_id,seller_id,followed_at,purchase_count\n")
            for user in fans[part::2]:
                f.write(f"{user},42,{rfc3339(cut - timedelta(days=3))},0\n")
    manifest = {"snapshot_time": rfc3339(cut), "files": files, "rows": len(fans)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def page_request(user: str) -> pricing_pb2.BatchGetLowestPriceRequest:
    """The one-item page every check of this module asks for."""
    return pricing_pb2.BatchGetLowestPriceRequest(
        user_id=user,
        items=[
            pricing_pb2.PriceQuery(
                item_id="1001",
                list_price=common_pb2.Money(currency_code="CNY", amount_minor=2500),
            )
        ],
    )


def price(stub: pricing_pb2_grpc.PricingServiceStub, user: str) -> pricing_pb2.ItemPrice:
    response = stub.BatchGetLowestPrice(page_request(user), timeout=5)
    assert not response.degraded
    assert len(response.prices) == 1
    item: pricing_pb2.ItemPrice = response.prices[0]
    return item


def settled_price(stub: pricing_pb2_grpc.PricingServiceStub, user: str) -> pricing_pb2.ItemPrice:
    """:func:`price` once the server's Redis client has settled after the faults: a degraded
    answer (its breaker still open, or a first request on a moved slot) is asked again."""
    deadline = time.monotonic() + 5
    while True:
        response = stub.BatchGetLowestPrice(page_request(user), timeout=5)
        if not response.degraded:
            item: pricing_pb2.ItemPrice = response.prices[0]
            return item
        assert time.monotonic() < deadline, f"{user}: still degraded"
        time.sleep(0.1)


class Publisher(threading.Thread):
    """Publishes follow/unfollow events for ``BUYERS`` (random, ~300/s) until stopped.

    Each batch is confirmed by a replica (``WAIT``) before the next one, as a durable producer
    would: so a ``kill -9`` of a master cannot lose an acknowledged event, and the final state
    of every buyer is known (:attr:`last`). A batch cut by a failover is published again
    (duplicates are harmless: last writer wins by the event time).
    """

    def __init__(self, url: str, namespace: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.namespace = namespace
        self.stop = threading.Event()
        self.last: dict[str, str] = {}
        self.published = 0
        self.retried = 0
        self.error: BaseException | None = None
        self.last_id_ms = 0

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        settings = load_settings(redis_url=self.url, redis_namespace=self.namespace)
        client = make_redis(settings)
        pub = PartitionedPublisher(client, f"{self.namespace}pricing:relation-events", PARTITIONS)
        acks = ReplicaAcks(client, f"{self.namespace}test:producer-ack:")
        rng = random.Random(7)
        t = time.time_ns() // 1_000_000 - 60_000
        try:
            while not self.stop.is_set():
                batch = []
                for _ in range(15):
                    t += 1
                    user = rng.choice(BUYERS)
                    kind = rng.choice(("follow", "unfollow"))
                    batch.append((user, kind, make_event(kind, user, "42", t)))
                while True:
                    try:
                        ids = await pub.publish([e for _, _, e in batch])
                        await acks.wait({pub.stream_of(u) for u, _, _ in batch})
                        break
                    except TRANSIENT_ERRORS:
                        self.retried += 1
                        await asyncio.sleep(0.05)
                for user, kind, _ in batch:
                    self.last[user] = kind
                self.published += len(batch)
                self.last_id_ms = max(int(i.split("-")[0]) for i in ids)
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()


class Reader(threading.Thread):
    """Reads prices without pause; every RPC must answer OK (degraded is allowed)."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.stop = threading.Event()
        self.ok = 0
        self.degraded = 0
        self.failures: list[str] = []

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            i = 0
            while not self.stop.is_set():
                user = BUYERS[i % len(BUYERS)]
                i += 1
                try:
                    r = stub.BatchGetLowestPrice(
                        pricing_pb2.BatchGetLowestPriceRequest(
                            user_id=user, items=[pricing_pb2.PriceQuery(item_id="1001")]
                        ),
                        timeout=5,
                    )
                    self.ok += 1
                    self.degraded += int(r.degraded)
                except grpc.RpcError as err:
                    self.failures.append(f"{err.code()}: {err.details()}")
                time.sleep(0.005)


def test_end_to_end_on_a_cluster_through_resharding_failover_and_a_killed_master(
    cluster: RedisCluster, namespace: str, tmp_path: Path
) -> None:
    cluster.wait_ok()
    env = service_env(
        redis_url=cluster.url,
        namespace=namespace,
        tmp=tmp_path,
        extra={"PRICING_EVENT_PARTITIONS": str(PARTITIONS), "PRICING_STRICT_MAX_LAG_MS": "3000"},
    )
    now = datetime.now(UTC)
    write_snapshot(tmp_path / "snap", now - timedelta(minutes=5), BUYERS[:30])
    loads = [
        sync_worker(env, tmp_path / f"load{i}.log", "load-snapshot", str(tmp_path / "snap"),
                    "--claim")
        for i in range(2)
    ]  # fmt: skip
    assert [p.proc.wait(60) for p in loads] == [0, 0], [p.log() for p in loads]
    reports = [json.loads(p.log().strip().splitlines()[-1]) for p in loads]
    assert sum(r["memberships_written"] for r in reports) == 30  # each part loaded once
    assert sorted(p for r in reports for p in r["parts"]) == ["part-00000.csv", "part-00001.csv"]

    server = pricing_service(env, tmp_path / "server.log")
    workers: list[Proc] = []
    publisher = Publisher(cluster.url, namespace)
    reader = Reader(env["PRICING_LISTEN"])
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        workers = [sync_worker(env, tmp_path / f"worker{i}.log", "consume") for i in range(2)]
        with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
            upsert_fan_rule(channel, 1888)
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            deadline = time.monotonic() + 10
            while not price(stub, BUYERS[0]).discounted:  # snapshot fan, rule indexed
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            assert not price(stub, BUYERS[40]).discounted  # not in the snapshot
            deadline = time.monotonic() + 10  # until the workers published a watermark
            while strict_verdict(stub, BUYERS[0]) != pricing_pb2.VERDICT_ELIGIBLE:
                assert time.monotonic() < deadline, workers[0].log()
                time.sleep(0.1)
            assert strict_verdict(stub, BUYERS[40]) == pricing_pb2.VERDICT_NOT_IN_CROWD

            publisher.start()
            reader.start()
            time.sleep(1.0)
            layout = MembershipLayout(namespace)
            # 1. resharding: the slots of a third of the buyers move to another master
            slots = sorted({keyslot(layout.user_key(u)) for u in BUYERS[::3]})
            source = cluster.master_of_slot(slots[0])
            target = next(p for p in cluster.master_ports() if p != source)
            moving = [s for s in slots if cluster.master_of_slot(s) == source]
            for s in moving:
                cluster.migrate_slots(range(s, s + 1), target, batch=2)
            assert all(cluster.master_of_slot(s) == target for s in moving)
            time.sleep(1.0)
            # 2. graceful failover of the master holding partition 0
            stream0 = f"{namespace}pricing:relation-events:{{0}}"
            promoted = cluster.failover(cluster.master_of_slot(keyslot(stream0)))
            time.sleep(1.0)
            # 3. kill -9 of another master (a replica takes over after the node timeout)
            victim = next(p for p in cluster.master_ports() if p != promoted)
            cluster.kill_master(victim)
            time.sleep(2.0)
            publisher.stop.set()
            publisher.join(30)
            assert publisher.error is None, repr(publisher.error)
            assert publisher.published > 300, publisher.published

            # every event published is applied once the watermark passes the last one
            wm_key = layout.watermark_key
            deadline = time.monotonic() + 30
            while True:
                wm = cluster_get(cluster, wm_key)
                if wm is not None and wm > publisher.last_id_ms:
                    break
                assert time.monotonic() < deadline, (wm, publisher.last_id_ms, workers[0].log())
                time.sleep(0.1)
            reader.stop.set()
            reader.join(30)
            for user in BUYERS:
                expect = publisher.last.get(user, "follow" if user in BUYERS[:30] else None)
                got = settled_price(stub, user).discounted
                assert got == (expect == "follow"), (user, expect, got)
            deadline = time.monotonic() + 15
            fan = next(u for u in BUYERS if publisher.last.get(u) == "follow")
            while strict_verdict(stub, fan) != pricing_pb2.VERDICT_ELIGIBLE:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.2)
        assert not reader.failures, reader.failures[:5]
        assert reader.ok > 200, reader.ok
        cluster.restart_node(victim)
    finally:
        publisher.stop.set()
        reader.stop.set()
        codes = [server.terminate()] + [w.terminate() for w in workers]
    logs = "\n".join(w.log_path.read_text(errors="replace") for w in workers)
    server_log = server.log_path.read_text(errors="replace")
    assert codes == [0] * (1 + len(workers)), (codes, server_log[-6000:], logs[-3000:])
    assert "replication_unprotected" in logs  # the killed master's shard had no replica left
    assert "Traceback" not in logs and "Traceback" not in server_log


def cluster_get(cluster: RedisCluster, key: str) -> int | None:
    with contextlib.closing(
        redis.RedisCluster(host="127.0.0.1", port=cluster.live[0].port, socket_timeout=5)
    ) as c:
        try:
            raw = c.get(key)
        except redis.RedisError:
            return None
    return int(raw) if raw is not None else None


def test_a_rule_change_reaches_every_pricing_replica_within_the_refresh_bound(
    cluster: RedisCluster, namespace: str, tmp_path: Path, pg_url: str
) -> None:
    """Three pricing-service replicas on one PostgreSQL rule store and the Redis Cluster: a
    rule written through one replica prices on all three within the refresh interval (plus
    scheduling slack on this shared machine), and a deletion likewise."""
    cluster.wait_ok()
    interval_ms = 200
    with pg_schema(pg_url) as store_url:
        envs = [
            service_env(
                redis_url=cluster.url,
                namespace=namespace,
                tmp=tmp_path,
                extra={
                    "PRICING_RULE_STORE_URL": store_url,
                    "PRICING_RULE_REFRESH_INTERVAL_MS": str(interval_ms),
                },
            )
            for _ in range(3)
        ]
        servers = [pricing_service(e, tmp_path / f"replica{i}.log") for i, e in enumerate(envs)]
        try:
            for e, s in zip(envs, servers, strict=True):
                wait_serving(e["PRICING_LISTEN"], s)
            channels = [grpc.insecure_channel(e["PRICING_LISTEN"]) for e in envs]
            stubs = [pricing_pb2_grpc.PricingServiceStub(c) for c in channels]

            upsert_fan_rule(channels[0], 1888)
            seed_fan(cluster, namespace, "fan")
            delays = [visible_for_fan(stubs, 1888)]
            upsert_fan_rule(channels[0], 1700)
            delays.append(visible_for_fan(stubs, 1700))
            bound_s = interval_ms / 1000 + 0.8  # one poll interval + slack for a loaded host
            assert max(delays) < bound_s, delays
            for c in channels:
                c.close()
        finally:
            codes = [s.terminate() for s in servers]
        assert codes == [0, 0, 0], [s.log_path.read_text()[-2000:] for s in servers]


def seed_fan(cluster: RedisCluster, namespace: str, user: str) -> None:
    async def go() -> None:
        from pricing_service.domain import SystemClock  # noqa: PLC0415
        from pricing_service.membership import derive  # noqa: PLC0415
        from pricing_service.membership.store import MembershipStore  # noqa: PLC0415

        client = make_redis(load_settings(redis_url=cluster.url))
        try:
            store = MembershipStore(client, MembershipLayout(namespace), SystemClock())
            ttls = derive.Ttls.from_seconds(48 * 3600, 48 * 3600, 30)
            at = time.time_ns() // 1_000_000 - 1000
            await store.apply(derive.follow(user, "42", at, ttls))
        finally:
            await client.aclose()

    asyncio.run(go())


def visible_for_fan(stubs: list[pricing_pb2_grpc.PricingServiceStub], amount: int) -> float:
    """Seconds until every replica prices item 1001 for ``fan`` at ``amount`` (discounted)."""
    start = time.monotonic()
    pending = set(range(len(stubs)))
    while pending:
        for i in list(pending):
            p = price(stubs[i], "fan")
            if p.discounted and p.price.amount_minor == amount:
                pending.discard(i)
        assert time.monotonic() - start < 5, f"replicas {sorted(pending)} never showed {amount}"
        time.sleep(0.005)
    return time.monotonic() - start


def test_cli_publish_puts_each_event_in_its_buyers_partition(
    cluster: RedisCluster, namespace: str, tmp_path: Path
) -> None:
    cluster.wait_ok()
    env = service_env(
        redis_url=cluster.url,
        namespace=namespace,
        tmp=tmp_path,
        extra={"PRICING_EVENT_PARTITIONS": str(PARTITIONS)},
    )
    lines = [
        {
            "type": "follow",
            "user_id": f"cli{i}",
            "seller_id": "42",
            "occurred_at": 1_750_000_000_000,
        }
        for i in range(12)
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    done = run_sync_worker(env, "publish", "--file", str(path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["published"] == 12
    bad = run_sync_worker(env, "publish", "--type", "follow", "--user", "", "--seller", "42")
    assert bad.returncode != 0  # refused before anything is published
    stream = env["PRICING_EVENTS_STREAM"]
    with contextlib.closing(
        redis.RedisCluster(host="127.0.0.1", port=cluster.live[0].port, socket_timeout=5)
    ) as c:
        assert c.exists(stream) == 0  # no unpartitioned stream
        seen: dict[str, str] = {}
        total = 0
        for k in range(PARTITIONS):
            for _, fields in c.xrange(f"{stream}:{{{k}}}") or []:
                assert fields is not None
                raw = fields[b"event"]
                assert isinstance(raw, bytes)
                ev = events_pb2.RelationEvent.FromString(raw)
                seen[ev.user_id] = f"{stream}:{{{k}}}"
                total += 1
    assert total == 12
    for user, where in seen.items():
        assert where == f"{stream}:{{{partition_of(user, PARTITIONS)}}}"
    assert len(set(seen.values())) > 1  # spread over partitions
    status = run_sync_worker(env, "status")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["partitions"], report["stream_length"]) == (PARTITIONS, 12)
    assert report["watermark_ms"] is None and not report["caught_up"]  # no consumer yet
