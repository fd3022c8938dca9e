"""BoundedRedisCluster's failover hardening, on a client that never connects (redis-py's
command path replaced): a connection closed under a command is a ConnectionError, and after a
transient error a caller's deadline returns at once even if redis-py loses the cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from pricing_service.redis_cluster import BoundedRedisCluster

CLOSED = AttributeError("'NoneType' object has no attribute 'writelines'")


@pytest.fixture
async def client() -> AsyncIterator[BoundedRedisCluster]:
    c = BoundedRedisCluster(startup_nodes=[ClusterNode("127.0.0.1", 1)], limit=4)
    yield c
    await c.aclose()


def replace_command(monkeypatch: pytest.MonkeyPatch, fn: Any) -> None:
    monkeypatch.setattr(aioredis.RedisCluster, "execute_command", fn)


async def test_a_connection_closed_under_a_command_is_a_connection_error(
    client: BoundedRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def closed(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise CLOSED

    replace_command(monkeypatch, closed)
    with pytest.raises(RedisConnectionError, match="closed under the command"):
        await client.hmget("k", ["f"])

    async def bug(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'Foo' object has no attribute 'bar'")

    replace_command(monkeypatch, bug)
    with pytest.raises(AttributeError, match="Foo"):  # anything else is not hidden
        await client.hmget("k", ["f"])


async def test_a_pipeline_whose_connection_was_closed_raises_a_connection_error(
    client: BoundedRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def closed(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise CLOSED

    monkeypatch.setattr(ClusterPipeline, "execute", closed)
    pipe = client.pipeline()
    pipe.hmget("k", ["f"])
    with pytest.raises(RedisConnectionError):
        await pipe.execute()


async def test_after_a_transient_error_a_deadline_returns_even_if_the_command_ignores_it(
    client: BoundedRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python 3.11 ``wait_for`` race inside redis-py, modelled by a command that swallows
    its cancellation and carries on for 0.6 s."""
    finished = asyncio.Event()

    async def deaf(self: Any, *args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.6)
        await asyncio.sleep(0.6)
        finished.set()
        return [None]

    async def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("node down")

    async def timed() -> float:
        start = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.hmget("k", ["f"])
        return time.monotonic() - start

    replace_command(monkeypatch, deaf)
    assert await timed() > 0.5  # inline (no trouble seen): the lost cancellation costs time
    replace_command(monkeypatch, failing)
    with pytest.raises(RedisConnectionError):
        await client.hmget("k", ["f"])
    replace_command(monkeypatch, deaf)
    finished.clear()
    assert await timed() < 0.3  # guarded: the caller's deadline holds
    await asyncio.wait_for(finished.wait(), 5)  # the abandoned command ran out in the background
