"""The whole system, on services of its own, for fault injection.

Every fault test gets a private redis-server (AOF on, ``appendfsync everysec``: the setting
docs/OPERATIONS.md asks for when events must survive a Redis crash), the real
``pricing-service`` and ``sync-worker consume`` processes, and a :class:`Load` with its model.
The cluster fault tests get a private Redis Cluster instead (:class:`ClusterSystem`: 3 masters
+ 3 replicas, partitioned events, WAIT before XACK). Short timeouts everywhere so that a fault
shows within a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Self

import pytest

from pricing_testing.load import Call, Load, LoadConfig, Population
from pricing_testing.postgres_server import PostgresServer
from pricing_testing.procs import Proc, pricing_service, service_env, sync_worker, wait_serving
from pricing_testing.redis_cluster import RedisCluster
from pricing_testing.redis_server import RedisServer
from tests.conftest import service_missing
from tests.support.clusters import running_cluster

STRICT_MAX_LAG_MS = 1000

#: Environment of every process of a fault test (on top of ``service_env``).
FAULT_ENV = {
    "PRICING_REDIS_SOCKET_TIMEOUT_MS": "500",
    "PRICING_REDIS_CONNECT_TIMEOUT_MS": "200",
    "PRICING_STRICT_MAX_LAG_MS": str(STRICT_MAX_LAG_MS),
    "PRICING_BREAKER_RESET_MS": "200",
    # a 2-core machine shared with the load generator: 50 ms is blown by CPU hiccups alone
    "PRICING_MEMBERSHIP_BUDGET_MS": "200",
    "PRICING_STREAM_CLAIM_IDLE_MS": "1000",
    "PRICING_STREAM_BATCH_SIZE": "200",
    "PRICING_GRACE_PERIOD_S": "5",
    "PRICING_LOG_LEVEL": "INFO",
}


def now_ms() -> float:
    return time.time() * 1000


async def in_thread(fn: Callable[[], object]) -> None:
    """Blocking fault actions off the event loop, so the load's clocks keep running."""
    await asyncio.to_thread(fn)


def assert_mostly_fresh(calls: list[Call], what: str) -> None:
    """Undegraded answers, bar a CPU hiccup or two (the budget is 200 ms on a busy 2-core box)."""
    stale = sum(c.degraded for c in calls)
    assert calls and stale <= max(2, len(calls) // 50), f"{what}: {stale}/{len(calls)}"


def unrecovered(load: Load, end_ms: float) -> str:
    """What was still wrong in the second of load before ``end_ms`` ("" = nothing): batch
    answers must be undegraded again (bar a CPU hiccup or two), strict must answer again."""
    since_ms = end_ms - 1000
    batch = load.calls_between("BatchGetLowestPrice", since_ms, end_ms)
    strict = load.calls_between("CheckDiscountStrict", since_ms, end_ms)
    stale = sum(c.degraded for c in batch)
    if not batch or stale > max(2, len(batch) // 50):
        return f"batch answers still degraded after the fault: {stale}/{len(batch)}"
    refused = [f"{c.code}/{c.reason}" if c.reason else c.code for c in strict if c.code != "OK"]
    if not strict or len(refused) > max(1, len(strict) // 50):
        return f"strict still refuses after the fault: {refused} of {len(strict)}"
    return ""


async def wait_recovered(load: Load, *, settle_s: float = 1.5, timeout_s: float = 30) -> None:
    """Keep the load running after a fault until a whole second of it looks recovered
    (:func:`unrecovered`), at least ``settle_s``: on a loaded host a restarted process may
    take longer than a fixed sleep to start. Does not assert; :func:`assert_recovered` does,
    after ``load.stop()``."""
    await asyncio.sleep(settle_s)
    for _ in range(int(timeout_s / 0.25)):  # polling the load's own record of answers
        if not unrecovered(load, time.time() * 1000):
            return
        await asyncio.sleep(0.25)


def assert_recovered(load: Load) -> None:
    """In the last second of load, after the fault: batch answers undegraded again, strict
    answers again."""
    assert load.stopped_ms, "call after load.stop()"
    problem = unrecovered(load, load.stopped_ms)
    assert not problem, problem


class Deployment:
    """Pricing server(s) + stream consumer(s) on one Redis URL, started and stopped by the
    test; :class:`System` (one private redis-server) and :class:`ClusterSystem` (a private
    Redis Cluster) add the Redis side."""

    #: the load's producer waits for this many replicas per batch (``WAIT``; 0 = not)
    producer_wait_replicas = 0

    def __init__(self, redis_url: str, tmp: Path, extra: Mapping[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.namespace = f"fault:{uuid.uuid4().hex[:8]}:"
        self.env = service_env(
            redis_url=redis_url,
            namespace=self.namespace,
            tmp=tmp,
            extra={**FAULT_ENV, **(extra or {})},
        )
        self.servers: list[Proc] = []
        self.workers: list[Proc] = []
        self._logs = 0

    @property
    def target(self) -> str:
        return self.env["PRICING_LISTEN"]

    def _log(self, name: str) -> Path:
        self._logs += 1
        return self.tmp / f"{self._logs:02d}-{name}.log"

    def start_server(self) -> Proc:
        proc = pricing_service(self.env, self._log("server"))
        self.servers.append(proc)
        wait_serving(self.target, proc)
        return proc

    def start_worker(self) -> Proc:
        proc = sync_worker(self.env, self._log("worker"), "consume")
        self.workers.append(proc)
        return proc

    def load(self, population: Population | None = None, **config: object) -> Load:
        cfg = LoadConfig(strict_max_lag_ms=STRICT_MAX_LAG_MS)
        for k, v in config.items():
            setattr(cfg, k, v)
        return Load(
            target=self.target,
            redis_url=self.redis_url,
            namespace=self.namespace,
            events_stream=self.env["PRICING_EVENTS_STREAM"],
            consumer_group=self.env["PRICING_CONSUMER_GROUP"],
            dead_letter_stream=self.env["PRICING_DEAD_LETTER_STREAM"],
            population=population or Population.make("u"),
            config=cfg,
            partitions=int(self.env.get("PRICING_EVENT_PARTITIONS", "1")),
            producer_wait_replicas=self.producer_wait_replicas,
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in self.servers + self.workers
        )

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every live process; exit codes by log name (a stuck one is killed: -9)."""
        codes = {}
        for p in self.servers + self.workers:
            if p.alive():
                codes[p.log_path.stem] = p.terminate(timeout=15)
        return codes

    def kill_all(self) -> None:
        for p in self.servers + self.workers:
            p.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


class System(Deployment):
    """Private Redis + pricing server(s) + stream consumer, started and stopped by the test."""

    def __init__(
        self, redis: RedisServer, tmp: Path, extra: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(redis.url, tmp, extra)
        self.redis = redis


#: Event partitions of a cluster fault test: spread over the three masters.
CLUSTER_PARTITIONS = 4


class ClusterSystem(Deployment):
    """A private Redis Cluster (3 masters + 3 replicas) + pricing server + partitioned stream
    consumers that acknowledge an entry only after a replica has its writes (``WAIT``)."""

    producer_wait_replicas = 1

    def __init__(
        self, cluster: RedisCluster, tmp: Path, extra: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(
            cluster.url,
            tmp,
            {
                "PRICING_EVENT_PARTITIONS": str(CLUSTER_PARTITIONS),
                "PRICING_REDIS_WAIT_REPLICAS": "1",
                **(extra or {}),
            },
        )
        self.cluster = cluster


@pytest.fixture
def fault_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
    try:
        server.start()
    except RuntimeError as exc:
        service_missing("redis-server binary", exc)
    yield server
    server.close()


@pytest.fixture
def system(fault_redis: RedisServer, tmp_path: Path) -> Iterator[System]:
    with System(fault_redis, tmp_path) as s:
        yield s


@contextlib.asynccontextmanager
async def started(system: Deployment, *, workers: int = 1, **load: object) -> AsyncIterator[Load]:
    """Server + worker(s) started, state seeded, strict ready; the processes must exit 0 at
    the end (no process stuck)."""
    system.start_server()
    for _ in range(workers):
        system.start_worker()
    running = system.load(None, **load)
    try:
        await running.seed_state()
        await running.wait_strict_ready()
        yield running
    finally:
        await running.close()
    codes = system.stop_all()
    assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n{system.logs()}"


@pytest.fixture
async def running(system: System) -> AsyncIterator[tuple[System, Load]]:
    async with started(system) as load:
        yield system, load


@pytest.fixture
def fault_cluster() -> Iterator[RedisCluster]:
    """A cluster of the test's own: its masters get killed and failed over."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster_system(fault_cluster: RedisCluster, tmp_path: Path) -> Iterator[ClusterSystem]:
    with ClusterSystem(fault_cluster, tmp_path) as s:
        yield s


# --- a private PostgreSQL ---------------------------------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except (RuntimeError, OSError, KeyError) as exc:
        service_missing("a private PostgreSQL (initdb/pg_ctl)", exc)
        raise  # unreachable: service_missing skips or fails
    try:
        server.init()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        server.close()
        service_missing("a private PostgreSQL (initdb/pg_ctl)", exc)
    yield server
    server.close()
