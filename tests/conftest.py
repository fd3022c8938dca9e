"""Shared fixtures: real Redis and PostgreSQL, isolated per test.

Integration tests need real services. When one is missing they are skipped, unless
``PRICING_TEST_REQUIRE_SERVICES=1`` (set by CI and ``make test``), which turns the skip into a
failure so a green run never hides untested integration code.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from pricing_testing.redis_server import RedisServer

REDIS_URL = os.environ.get("PRICING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("PRICING_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE = os.environ.get("PRICING_TEST_REQUIRE_SERVICES", "") not in ("", "0", "false")
#: The gRPC server runtimes every server-starting test runs on (``PRICING_SERVER_RUNTIME``
#: values; ``PRICING_TEST_RUNTIMES=native`` narrows a run to one).
SERVER_RUNTIMES = tuple(
    r.strip()
    for r in os.environ.get("PRICING_TEST_RUNTIMES", "grpcio-aio,native").split(",")
    if r.strip()
)


def service_missing(what: str, why: object) -> None:
    msg = f"{what} is not reachable ({why})"
    if REQUIRE:
        pytest.fail(msg + " and PRICING_TEST_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(params=SERVER_RUNTIMES)
def server_runtime(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server runtime of this test: set in the environment, where ``load_settings`` (in
    process) and ``pricing_testing.procs.service_env`` (child processes) read it."""
    runtime: str = request.param
    monkeypatch.setenv("PRICING_SERVER_RUNTIME", runtime)
    return runtime


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        service_missing(f"Redis at {REDIS_URL}", exc)
    return REDIS_URL


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A unique key prefix for one test; its keys are deleted afterwards."""
    ns = f"test:{uuid.uuid4().hex[:12]}:"
    yield ns
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    keys = list(client.scan_iter(match=f"{ns}*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    yield client
    await client.aclose()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to be killed, paused or restarted."""
    server = RedisServer()
    try:
        server.start()
    except RuntimeError as exc:
        service_missing("redis-server binary", exc)
    yield server
    server.close()


@pytest.fixture(scope="session")
def pg_url() -> str:
    try:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        service_missing(f"PostgreSQL at {PG_URL}", exc)
    return PG_URL
