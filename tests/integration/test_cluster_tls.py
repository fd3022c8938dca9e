"""``rediss+cluster://``: TLS to a real Redis Cluster (3 masters + 3 replicas, TLS only).

Every node listens on TLS only (``--port 0 --tls-port``), replicates and talks on the cluster
bus over TLS, and requires a client certificate signed by the test CA (certificates made by
``pricing_testing.certs``). The service's client gets the CA and its certificate from the same
``PRICING_REDIS_TLS_*`` settings as ``rediss://``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.config import Settings, load_settings
from pricing_service.domain import Crowd, CrowdKind, SystemClock
from pricing_service.errors import ConfigError
from pricing_service.membership import derive
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import is_cluster, make_redis, parse_cluster_url
from pricing_service.replica_acks import ReplicaAcks
from pricing_testing.certs import CertFiles, make_certs
from pricing_testing.procs import (
    Proc,
    pricing_service,
    run_sync_worker,
    service_env,
    sync_worker,
    wait_serving,
)
from pricing_testing.redis_cluster import RedisCluster, keyslot
from tests.support.clusters import running_cluster
from tests.support.rpcs import strict_verdict, upsert_fan_rule

pytestmark = pytest.mark.integration

TTLS = derive.Ttls.from_seconds(48 * 3600, 48 * 3600, 30)
FANS = Crowd("42", CrowdKind.ALL_FANS)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def cluster(certs: CertFiles) -> Iterator[RedisCluster]:
    with running_cluster(tls=certs) as c:
        yield c


def tls_settings(certs: CertFiles, *, ca: bool = True, client_cert: bool = True) -> dict[str, str]:
    out = {"redis_tls_ca_file": str(certs.ca)} if ca else {}
    if client_cert:
        out |= {
            "redis_tls_cert_file": str(certs.client_cert),
            "redis_tls_key_file": str(certs.client_key),
        }
    return out


def settings(cluster: RedisCluster, certs: CertFiles, **tls: bool) -> Settings:
    return load_settings(
        redis_url=cluster.url, redis_connect_timeout_ms=500, **tls_settings(certs, **tls)
    )


@pytest.fixture
async def client(cluster: RedisCluster, certs: CertFiles) -> AsyncIterator[aioredis.Redis]:
    cluster.wait_ok()
    r = make_redis(settings(cluster, certs))
    yield r
    await r.aclose()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- configuration ----------------------------------------------------------------------------
def test_a_tls_cluster_url_has_the_same_seed_syntax() -> None:
    seeds = parse_cluster_url("rediss+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001/")
    assert seeds.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (seeds.username, seeds.password, seeds.tls) == ("app", "s@cret", True)
    assert not parse_cluster_url("redis+cluster://h:1").tls


@pytest.mark.parametrize(
    "url",
    [
        "rediss+cluster://",
        "rediss+cluster://host",
        "rediss+cluster://h:1,,h:2",
        "rediss+cluster://h:70000",
        "redis+cluster://h:x",
        "redisss+cluster://h:1",
    ],
)
def test_bad_cluster_urls_stop_the_process_at_start_up(url: str) -> None:
    """Checked when the settings are loaded (both processes' start-up), naming the variable."""
    with pytest.raises(ConfigError, match="PRICING_REDIS_URL"):
        load_settings(redis_url=url)


def test_missing_tls_files_are_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PRICING_REDIS_TLS_CA_FILE: no such file"):
        load_settings(
            redis_url="rediss+cluster://127.0.0.1:7000",
            redis_tls_ca_file=str(tmp_path / "missing.pem"),
        )


# --- the cluster over TLS ---------------------------------------------------------------------
async def test_membership_written_and_read_through_the_store_over_tls(
    cluster: RedisCluster, client: aioredis.Redis
) -> None:
    assert is_cluster(client)
    layout = MembershipLayout(f"tls:{uuid.uuid4().hex[:8]}:")
    store = MembershipStore(client, layout, SystemClock())
    users = [f"u{i}" for i in range(60)]
    masters = {cluster.master_of_slot(keyslot(layout.user_key(u))) for u in users}
    assert len(masters) == 3  # one pipeline, TLS connections to every master
    at = now_ms() - 1000
    result = await store.apply([w for u in users for w in derive.follow(u, "42", at, TTLS)])
    assert result.applied == len(users) and not result.failed_users
    for u in users[:10]:
        assert await store.member_crowds(u, [FANS]) == {FANS}
    unf = await store.apply(derive.unfollow(users[0], "42", at + 1, TTLS))
    assert unf.applied == 1  # the follow part becomes a tombstone
    assert await store.member_crowds(users[0], [FANS]) == frozenset()
    # replication runs over TLS too: a replica of every master acknowledges the writes
    acks = ReplicaAcks(client, f"{layout.namespace}ack:")
    done = await acks.wait([layout.user_key(u) for u in users])
    assert done.primaries == 3 and done.ok and not done.unprotected, done


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"ca": False, "client_cert": False}, "certificate verify failed"),
        ({"ca": False, "client_cert": True}, "certificate verify failed"),
        # TLS 1.3: the server checks the client's certificate after the client finished its
        # side of the handshake, so the refusal is the server's alert or, if the client read
        # first, the connection it reset
        ({"ca": True, "client_cert": False}, "certificate required|connection reset"),
    ],
    ids=["no-ca", "no-ca-with-client-cert", "no-client-cert"],
)
async def test_a_client_without_the_ca_or_a_certificate_is_refused_promptly(
    cluster: RedisCluster, certs: CertFiles, tls: dict[str, bool], error: str
) -> None:
    """Refused at the handshake: a ConnectionError (an outage to callers) that says why,
    within the connect timeout, never a hang."""
    cluster.wait_ok()
    r = make_redis(settings(cluster, certs, **tls))
    start = time.monotonic()
    try:
        with pytest.raises(RedisConnectionError) as caught:
            await asyncio.wait_for(r.hmget("cm:{u}", ["1"]), 10)
    finally:
        await r.aclose()
    assert time.monotonic() - start < 5
    assert re.search(error, str(caught.value).lower()), str(caught.value)


async def test_plaintext_to_the_tls_cluster_is_refused(cluster: RedisCluster) -> None:
    cluster.wait_ok()
    r = make_redis(load_settings(redis_url=cluster.url.replace("rediss+", "redis+", 1)))
    try:
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(r.ping(), 10)
    finally:
        await r.aclose()


# --- both processes ---------------------------------------------------------------------------
def test_server_and_sync_worker_run_on_the_tls_cluster(
    cluster: RedisCluster, certs: CertFiles, tmp_path: Path
) -> None:
    """``pricing-service`` and ``sync-worker consume`` (two partitions, WAIT on) on
    ``rediss+cluster://``: a follow published through the CLI discounts the buyer, an unfollow
    takes the discount back, checkout agrees, and every WAIT was answered by a replica."""
    cluster.wait_ok()
    namespace = f"tls:{uuid.uuid4().hex[:8]}:"
    env = service_env(
        redis_url=cluster.url,
        namespace=namespace,
        tmp=tmp_path,
        extra={
            "PRICING_REDIS_TLS_CA_FILE": str(certs.ca),
            "PRICING_REDIS_TLS_CERT_FILE": str(certs.client_cert),
            "PRICING_REDIS_TLS_KEY_FILE": str(certs.client_key),
            "PRICING_EVENT_PARTITIONS": "2",
            "PRICING_REDIS_WAIT_REPLICAS": "1",
            "PRICING_STRICT_MAX_LAG_MS": "3000",
        },
    )
    server = pricing_service(env, tmp_path / "server.log")
    procs: list[Proc] = [server]
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        procs.append(sync_worker(env, tmp_path / "worker.log", "consume"))
        with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
            upsert_fan_rule(channel, 1888)
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            publish(env, "follow", "alice")
            wait_for(lambda: discounted(stub, "alice"), True, procs)
            wait_for(lambda: strict_verdict(stub, "alice"), pricing_pb2.VERDICT_ELIGIBLE, procs)
            publish(env, "unfollow", "alice")
            wait_for(lambda: discounted(stub, "alice"), False, procs)
            wait_for(lambda: strict_verdict(stub, "alice"), pricing_pb2.VERDICT_NOT_IN_CROWD, procs)
        status = run_sync_worker(env, "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["partitions"] == 2
    finally:
        codes = [p.terminate() for p in procs]
    logs = [p.log_path.read_text(errors="replace") for p in procs]
    assert codes == [0] * len(procs), (codes, [log[-3000:] for log in logs])
    assert not any("Traceback" in log for log in logs)
    stopped = [
        json.loads(line) for line in logs[1].splitlines() if '"stream_consumer_stopped"' in line
    ]
    assert len(stopped) == 2  # one loop per partition
    assert sum(s["events_applied"] for s in stopped) == 2
    # every batch waited for a replica (in sync over TLS), none went unprotected
    assert sum(s["replication_unprotected"] for s in stopped) == 0, stopped


def publish(env: dict[str, str], kind: str, user: str) -> None:
    done = run_sync_worker(env, "publish", "--type", kind, "--user", user, "--seller", "42")
    assert done.returncode == 0, done.stdout + done.stderr


def discounted(stub: pricing_pb2_grpc.PricingServiceStub, user: str) -> bool | None:
    """Whether item 1001 is discounted for ``user`` (None: a degraded answer)."""
    r = stub.BatchGetLowestPrice(
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id=user,
            items=[
                pricing_pb2.PriceQuery(
                    item_id="1001",
                    list_price=common_pb2.Money(currency_code="CNY", amount_minor=2500),
                )
            ],
        ),
        timeout=5,
    )
    return None if r.degraded else bool(r.prices[0].discounted)


def wait_for(
    probe: Callable[[], object], want: object, procs: list[Proc], timeout_s: float = 20
) -> None:
    """Until ``probe()`` answers ``want`` (fails early when a process died)."""
    deadline = time.monotonic() + timeout_s
    got = probe()
    while got != want:
        assert all(p.alive() for p in procs), "\n".join(p.log()[-3000:] for p in procs)
        assert time.monotonic() < deadline, (got, want, procs[-1].log()[-3000:])
        time.sleep(0.1)
        got = probe()
