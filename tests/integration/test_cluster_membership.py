"""Membership, the sync consumer and WAIT on a real Redis Cluster (3 masters + 3 replicas).

The cluster is this module's own (``pricing_testing.redis_cluster``): tests that move slots,
fail over or kill nodes leave it with three masters serving every slot and every master with
a replica in sync, for the next test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from pricing.v1 import events_pb2
from pricing_service.config import Settings, load_settings
from pricing_service.domain import Crowd, CrowdKind, SystemClock
from pricing_service.errors import ConfigError
from pricing_service.membership import derive
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import (
    is_cluster,
    make_redis,
    parse_cluster_url,
)
from pricing_service.redis_errors import TRANSIENT_ERRORS
from pricing_service.replica_acks import ReplicaAcks
from pricing_testing.redis_cluster import RedisCluster, keyslot
from pricing_testing.redis_server import free_port
from sync_worker.claims import claim_key, load_claiming
from sync_worker.common import format_rfc3339_ms
from sync_worker.consumer import StreamConsumer
from sync_worker.events import FOLLOW, UNFOLLOW, EventPublisher, make_event
from sync_worker.partitions import (
    PartitionedConsumer,
    PartitionedPublisher,
    partition_of,
    partition_streams,
)
from sync_worker.snapshot import SnapshotLoader, snapshot_id
from tests.support.clusters import running_cluster

pytestmark = pytest.mark.integration

TTLS = derive.Ttls.from_seconds(48 * 3600, 48 * 3600, 30)
FANS = Crowd("42", CrowdKind.ALL_FANS)


async def follow_version(store: MembershipStore, user: str) -> int:
    """The version of the buyer's follow of seller 42, as stored."""
    facts = (await store.all_fields(user))[("facts", "42")]
    assert facts.follow is not None
    return int(facts.follow.version_ms)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with running_cluster() as c:
        yield c


@pytest.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[aioredis.Redis]:
    cluster.wait_ok()
    r = make_redis(load_settings(redis_url=cluster.url, redis_socket_timeout_ms=3000))
    yield r
    await r.aclose()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def follows(users: list[str], at: int) -> list[derive.MembershipWrite]:
    return [w for u in users for w in derive.follow(u, "42", at, TTLS)]


async def retrying(op, seconds: float = 20.0):  # type: ignore[no-untyped-def]
    """``op()`` until it stops failing with a transient cluster error (a failover)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await op()
        except TRANSIENT_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# --- configuration ----------------------------------------------------------------------------
def test_cluster_url_is_parsed_with_every_seed_and_credentials() -> None:
    seeds = parse_cluster_url("redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001/")
    assert seeds.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (seeds.username, seeds.password) == ("app", "s@cret")
    assert parse_cluster_url("redis+cluster://h:1").nodes == (("h", 1),)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://host",
        "redis+cluster://host:0",
        "redis+cluster://host:70000",
        "redis+cluster://h:1,,h:2",
        "redis+cluster://h:x",
        "redis://h:1",
    ],
)
def test_bad_cluster_urls_are_refused_naming_the_variable(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_cluster_url(url)
    assert "PRICING_REDIS_URL" in caught.value.message


# --- reads and writes -------------------------------------------------------------------------
async def test_one_pipeline_writes_buyers_on_every_master_and_one_hmget_reads_each(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    assert is_cluster(client)
    layout = MembershipLayout(namespace)
    store = MembershipStore(client, layout, SystemClock())
    users = [f"u{i}" for i in range(300)]
    masters = {cluster.master_of_slot(keyslot(layout.user_key(u))) for u in users}
    assert len(masters) == 3  # the batch really spans the three masters
    at = now_ms() - 1000
    result = await store.apply(follows(users, at))
    assert result.applied == 300 and not result.failed_users
    for u in users[:50]:
        assert await store.member_crowds(u, [FANS]) == {FANS}
    assert await store.member_crowds("nobody", [FANS]) == frozenset()
    # replay: idempotent, nothing applies twice
    again = await store.apply(follows(users, at))
    assert (again.applied, again.stale) == (0, 300)
    unf = await store.apply([w for u in users[:10] for w in derive.unfollow(u, "42", at + 1, TTLS)])
    assert unf.applied == 10  # one follow part per buyer: now a tombstone
    assert await store.member_crowds(users[0], [FANS]) == frozenset()
    assert await store.member_crowds(users[10], [FANS]) == {FANS}


async def test_writes_and_reads_continue_through_a_resharding(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    """Slots with live keys move to another master (ASK during the move, MOVED after) while a
    writer and a reader run: no write fails for a buyer (a transient redirection error fails
    the whole batch, which is retried, as the consumer does), no follower ever reads as a
    stranger."""
    layout = MembershipLayout(namespace)
    store = MembershipStore(client, layout, SystemClock())
    users = [f"r{i}" for i in range(200)]
    at = now_ms() - 60_000
    await store.apply(follows(users, at))
    source = cluster.master_of_slot(keyslot(layout.user_key(users[0])))
    target = next(p for p in cluster.master_ports() if p != source)
    slots = sorted({keyslot(layout.user_key(u)) for u in users})
    moving = [s for s in slots if cluster.master_of_slot(s) == source]
    assert len(moving) > 30
    stop = asyncio.Event()
    errors: list[BaseException] = []
    counts = {"writes": 0, "reads": 0, "transient": 0}

    async def writer() -> None:
        version = at
        while not stop.is_set():
            version += 1
            try:  # re-follow everyone with a newer version: every write must apply
                try:
                    r = await store.apply(follows(users, version))
                except TRANSIENT_ERRORS:  # the batch fails whole; retried as the consumer does
                    counts["transient"] += 1
                    r = await retrying(lambda v=version: store.apply(follows(users, v)))
                    r.applied += r.stale  # what applied before the error is stale now
                assert r.applied == len(users) and not r.failed_users, r
                counts["writes"] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    async def reader() -> None:
        i = 0
        while not stop.is_set():
            u = users[i % len(users)]
            i += 1
            try:
                assert await store.member_crowds(u, [FANS]) == {FANS}, u
                counts["reads"] += 1
            except TRANSIENT_ERRORS:  # the serving path degrades this page: never a wrong answer
                counts["transient"] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
    await asyncio.sleep(0.2)
    moved_keys = await asyncio.to_thread(
        lambda: sum(cluster.migrate_slots(range(s, s + 1), target, batch=5) for s in moving)
    )
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)
    assert not errors, errors
    assert moved_keys >= len(moving)
    assert counts["writes"] > 3 and counts["reads"] > 100, counts
    # redirections during a slot's move fail now and then (redis-py sends ASKING on another
    # connection; see docs/DEPLOYMENT.md): rare, transient, never a wrong answer
    assert counts["transient"] <= counts["reads"] // 10, counts
    for s in moving:
        assert cluster.master_of_slot(s) == target
    follows_ = [await follow_version(store, u) for u in users]
    assert all(v > at for v in follows_)


async def test_writes_survive_a_graceful_failover_and_the_script_is_reloaded(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    layout = MembershipLayout(namespace)
    store = MembershipStore(client, layout, SystemClock())
    users = [f"f{i}" for i in range(100)]
    at = now_ms() - 1000
    await store.apply(follows(users, at))
    acks = ReplicaAcks(client, f"{namespace}sync:replica-ack:")
    assert (await acks.wait([layout.user_key(u) for u in users])).ok
    old = cluster.master_of_slot(keyslot(layout.user_key(users[0])))
    new = await asyncio.to_thread(cluster.failover, old)
    # the promoted replica has the data; the script cache is the caller's to refill (NOSCRIPT)
    for u in users:
        assert await retrying(lambda u=u: store.member_crowds(u, [FANS])) == {FANS}
    # a batch cut by the failover raises and is retried whole: what applied before is stale
    result = await retrying(lambda: store.apply(follows(users, at + 5)))
    assert result.applied + result.stale == 100 and not result.failed_users
    for u in users:
        assert await follow_version(store, u) == at + 5
    assert cluster.master_of_slot(keyslot(layout.user_key(users[0]))) == new
    await asyncio.to_thread(cluster.failover, new)  # back as it was


async def test_acknowledged_writes_survive_kill_of_their_master_and_unprotected_is_reported(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    """Writes confirmed by WAIT are on the replica that takes over after ``kill -9``; with the
    shard's replica gone, the same wait reports the primary as unprotected (not ok-by-default),
    and writes go on."""
    layout = MembershipLayout(namespace)
    store = MembershipStore(client, layout, SystemClock())
    acks = ReplicaAcks(client, f"{namespace}sync:replica-ack:", info_ttl_s=0)
    users = [f"k{i}" for i in range(200)]
    at = now_ms() - 1000
    await store.apply(follows(users, at))
    assert (await acks.wait([layout.user_key(u) for u in users])).ok
    unf = [w for u in users[:100] for w in derive.unfollow(u, "42", at + 1, TTLS)]
    assert (await store.apply(unf)).applied == 100
    waited = await acks.wait([layout.user_key(u) for u in users[:100]])
    assert waited.ok and not waited.unprotected and waited.primaries == 3
    victim = cluster.master_of_slot(keyslot(layout.user_key(users[0])))
    on_victim = [u for u in users if cluster.master_of_slot(keyslot(layout.user_key(u))) == victim]
    promoted = await asyncio.to_thread(cluster.kill_master, victim)
    try:
        for u in on_victim:  # no applied unfollow lost, no follow lost
            got = await retrying(lambda u=u: store.member_crowds(u, [FANS]))
            assert got == (frozenset() if u in users[:100] else {FANS}), u
        key = layout.user_key(on_victim[0])
        waited = await retrying(lambda: acks.wait([key]))
        assert waited.unprotected == [f"127.0.0.1:{promoted}"] and waited.ok
        r = await retrying(lambda: store.apply(follows(on_victim, at + 10)))
        assert r.applied + r.stale == len(on_victim) and not r.failed_users
        assert await follow_version(store, on_victim[0]) == at + 10
    finally:
        await asyncio.to_thread(cluster.restart_node, victim)


# --- the stream consumer on the cluster -----------------------------------------------------
def consumer_settings(cluster: RedisCluster, namespace: str, partitions: int) -> Settings:
    return load_settings(
        redis_url=cluster.url,
        redis_namespace=namespace,
        events_stream=f"{namespace}events",
        dead_letter_stream=f"{namespace}events:dead",
        consumer_group=f"{namespace}g",
        event_partitions=partitions,
        stream_block_ms=200,
    )


async def test_partitions_spread_over_masters_and_two_consumers_apply_every_event(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    settings = consumer_settings(cluster, namespace, 6)
    streams = partition_streams(settings.events_stream, 6)
    assert streams[0] == f"{namespace}events:{{0}}"
    assert len({cluster.master_of_slot(keyslot(s)) for s in streams}) >= 2
    assert partition_of("buyer-1", 6) == partition_of("buyer-1", 6)
    assert partition_streams("s", 1) == ["s"] and partition_of("x", 1) == 0
    pub = PartitionedPublisher(client, settings.events_stream, 6)
    users = [f"p{i}" for i in range(120)]
    at = now_ms() - 10_000
    events = [make_event("follow", u, "42", at) for u in users]
    events += [make_event("unfollow", u, "42", at + 1) for u in users[::2]]
    ids = await pub.publish(events)
    assert len(ids) == len(events) and all(ids)
    for u in users[:6]:  # each buyer's events are in its own partition, in order
        mine: list[int] = []
        for _, fields in await client.xrange(pub.stream_of(u)) or []:
            assert fields is not None
            raw = fields[b"event"]
            assert isinstance(raw, bytes)
            ev = events_pb2.RelationEvent.FromString(raw)
            if ev.user_id == u:
                mine.append(ev.type)
        want = [FOLLOW, UNFOLLOW] if users.index(u) % 2 == 0 else [FOLLOW]
        assert mine == want, u
    workers = [
        PartitionedConsumer(settings, consumer_name=f"w{i}", watermark_interval_ms=50)
        for i in range(2)
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    store = MembershipStore(client, MembershipLayout(namespace), SystemClock())
    try:
        deadline = time.monotonic() + 15
        while True:
            wm = await client.get(MembershipLayout(namespace).watermark_key)
            if wm is not None and int(wm) > int(ids[-1].split("-")[0]):
                break
            assert time.monotonic() < deadline, [w.consumers[0].stats for w in workers]
            await asyncio.sleep(0.05)
        # the watermark promises every event before it is applied: check every buyer
        for i, u in enumerate(users):
            expect: set[Crowd] = set() if i % 2 == 0 else {FANS}
            assert await store.member_crowds(u, [FANS]) == expect, u
        applied = sum(c.stats.events_applied for w in workers for c in w.consumers)
        assert applied >= len(events)
        assert all(c.stats.replication_wait_short == 0 for w in workers for c in w.consumers)
        for s in streams:
            pending = await client.xpending(s, settings.consumer_group)
            assert pending["pending"] == 0
    finally:
        for w in workers:
            w.shutdown()
        await asyncio.gather(*tasks)
        for w in workers:
            await w.redis.aclose()


async def test_watermark_is_the_minimum_over_partitions(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    """An unconsumed entry in one partition holds the published watermark back, however far
    the other partitions are."""
    settings = consumer_settings(cluster, namespace, 3)
    worker = PartitionedConsumer(settings, consumer_name="solo")
    try:
        await worker.ensure_groups()
        pub = PartitionedPublisher(client, settings.events_stream, 3)
        ids = await pub.publish([make_event("follow", "lonely", "42", now_ms() - 1000)])
        held = int(ids[0].split("-")[0])
        await asyncio.sleep(0.05)
        w = await worker.update_watermark()
        assert w is not None and w <= held
        stuck = worker.consumers[partition_of("lonely", 3)]
        others = [c for c in worker.consumers if c is not stuck]
        for c in others:  # the empty partitions alone would be at "now"
            own = await c.update_watermark()
            assert own is not None and own > held
        await stuck._step()  # consume the one entry
        w2 = await worker.update_watermark()
        assert w2 is not None and w2 > held
    finally:
        await worker.redis.aclose()


async def test_single_stream_consumer_acknowledges_only_after_wait_on_the_cluster(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    settings = consumer_settings(cluster, namespace, 1)
    consumer = StreamConsumer(settings, consumer_name="c1")
    try:
        pub = EventPublisher(client, settings.events_stream)
        await consumer.ensure_group()
        await pub.publish([make_event("follow", f"s{i}", "42", now_ms() - 100) for i in range(50)])
        await consumer._step()
        assert consumer.stats.events_applied == 50
        assert consumer.stats.replication_unprotected == 0
        assert consumer.stats.replication_wait_short == 0
        pending = await client.xpending(settings.events_stream, settings.consumer_group)
        assert pending["pending"] == 0
    finally:
        await consumer.redis.aclose()


async def test_a_dead_letter_reaches_a_replica_before_its_entry_is_acknowledged(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str
) -> None:
    """A poison entry (no membership write) is acknowledged only after its dead letter was
    WAITed for: a failover right after the XACK cannot lose it from both streams."""
    settings = consumer_settings(cluster, namespace, 1)
    consumer = StreamConsumer(settings, consumer_name="c1")
    try:
        await consumer.ensure_group()
        await client.xadd(settings.events_stream, {b"garbage": b"not an event"})
        await consumer._step()
        assert sum(consumer.stats.dead_lettered.values()) == 1
        assert await client.xlen(settings.dead_letter_stream) == 1
        pending = await client.xpending(settings.events_stream, settings.consumer_group)
        assert pending["pending"] == 0
        assert consumer.replica_acks is not None
        marker = consumer.replica_acks.marker(settings.dead_letter_stream)
        assert await client.exists(marker) == 1  # the WAIT's marker, beside the dead letter
        assert consumer.stats.replication_unprotected == 0
    finally:
        await consumer.redis.aclose()


# --- snapshot loaders sharing parts by claims --------------------------------------------------
def write_parts(directory: Path, cut_ms: int, parts: int, per_part: int) -> list[str]:
    directory.mkdir()
    cut = format_rfc3339_ms(cut_ms)
    followed = format_rfc3339_ms(cut_ms - 3 * 86_400_000)
    files, users = [], []
    for p in range(parts):
        name = f"part-{p:03d}.csv"
        files.append(name)
        with (directory / name).open("w") as f:
            f.write("user_id,seller_id,followed_at,purchase_count\n")
            for i in range(per_part):
                users.append(f"snap{p}-{i}")
                f.write(f"snap{p}-{i},42,{followed},0\n")
    manifest = {"snapshot_time": cut, "files": files, "rows": parts * per_part}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return users


async def test_claiming_loaders_split_the_parts_and_take_over_a_dead_loaders_part(
    cluster: RedisCluster, client: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    settings = consumer_settings(cluster, namespace, 1)
    users = write_parts(tmp_path / "snap", now_ms() - 60_000, parts=6, per_part=40)
    loaders = [SnapshotLoader(settings, client, batch_rows=10) for _ in range(2)]
    manifest, counts = loaders[0].validate(tmp_path / "snap")
    sid = snapshot_id(manifest, counts)
    # a loader that died holding part 5: its claim lapses after its lease
    dead = claim_key(namespace, sid, manifest.files[5])
    await client.set(dead, "dead-loader", px=1500)
    t0 = time.monotonic()
    reports = await asyncio.gather(
        *(
            load_claiming(loader, tmp_path / "snap", lease_ms=3000, poll_s=0.1, owner=f"L{i}")
            for i, loader in enumerate(loaders)
        )
    )
    assert time.monotonic() - t0 >= 1.0  # part 5 waited for the dead claim to lapse
    assert all(r.ok for r in reports), [r.as_dict() for r in reports]
    loaded = [p for r in reports for p in r.parts]
    assert sorted(loaded) == sorted(manifest.files)  # every part once, by one loader
    assert all(r.parts for r in reports)  # both loaders got work
    assert sum(r.memberships_written for r in reports) == len(users)
    assert all(r.parts_skipped_done == sorted(manifest.files) for r in reports)
    store = MembershipStore(client, MembershipLayout(namespace), SystemClock())
    for u in users[::7]:
        assert await store.member_crowds(u, [FANS]) == {FANS}, u
    for f in manifest.files:  # claims released
        assert await client.exists(claim_key(namespace, sid, f)) == 0
    # a third run finds everything done and writes nothing
    again = await load_claiming(loaders[0], tmp_path / "snap", owner="L9")
    assert again.status == "already_loaded" and again.memberships_written == 0 and not again.parts


async def test_an_unreachable_cluster_is_an_outage_not_an_unexpected_error() -> None:
    """No seed answers: the client raises a ConnectionError (callers degrade or retry on it),
    not redis-py's RedisClusterException (not a RedisError)."""
    port = free_port()
    client = make_redis(
        load_settings(redis_url=f"redis+cluster://127.0.0.1:{port}", redis_connect_timeout_ms=200)
    )
    try:
        with pytest.raises(RedisConnectionError):
            await client.hmget("cm:{u}", ["1"])
        with pytest.raises(RedisConnectionError):
            await MembershipStore(client, MembershipLayout("x:"), SystemClock()).apply(
                follows(["u"], now_ms() - 1000)
            )
    finally:
        await client.aclose()
