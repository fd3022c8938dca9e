"""Workarounds for redis-py's asyncio Redis Cluster client (failover hardening).

:class:`BoundedRedisCluster` is what :func:`pricing_service.redis_client.make_redis` returns
for a ``redis[s]+cluster://`` URL: redis-py's cluster client with a standalone pool's
behaviour at its connection limit (wait, do not fail), a connection closed under a command by
another task reported as the ``ConnectionError`` it is, and caller deadlines that hold during
a failover. Each workaround names the redis-py behaviour it answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from pricing_service.redis_errors import TRANSIENT_ERRORS


def _closed_under_us(exc: AttributeError) -> RedisConnectionError | None:
    """The ``ConnectionError`` an ``AttributeError`` from redis-py's async cluster stands for,
    when it is a connection closed by another task while this one used it.

    On ``CLUSTERDOWN`` (a master failed, its replica not yet promoted) redis-py closes every
    connection of the client (``aclose``), and on a connection error every free connection of
    the node, including one that another task has just taken to connect or write on; that
    task then fails on the connection's cleared stream (``'NoneType' object has no attribute
    'writelines'``). For the caller it is a connection lost under its command: an outage to
    degrade on or retry, not an unexpected error (seen as INTERNAL answers during a failover).
    """
    if str(exc).startswith("'NoneType' object has no attribute"):
        return RedisConnectionError(f"connection closed under the command: {exc}")
    return None


#: Seconds after a transient error during which cluster commands run guarded (see
#: :class:`BoundedRedisCluster`).
GUARDED_S: Final = 10.0


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned command's outcome (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()


class BoundedClusterPipeline(ClusterPipeline):
    """redis-py's cluster pipeline, whose connection lost to another task's close is a
    ``ConnectionError`` (see :func:`_closed_under_us`)."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except AttributeError as exc:
            lost = _closed_under_us(exc)
            if lost is None:
                raise
            raise lost from exc


class BoundedRedisCluster(aioredis.RedisCluster):
    """A cluster client whose commands wait for a free slot instead of failing.

    redis-py's async cluster raises ``MaxConnectionsError`` as soon as a node's connection
    limit is reached; the standalone client (a blocking pool) waits. This keeps the
    standalone behaviour: at most ``limit`` commands in flight per client, so at most
    ``limit`` connections per node.

    A connection closed under a command by another task (a failover) is a
    ``ConnectionError``, for commands and pipelines alike (:func:`_closed_under_us`).

    Deadlines: callers bound a command by cancelling it (``asyncio.timeout``). On Python 3.11
    a cancellation that lands as an inner ``asyncio.wait_for`` of redis-py completes is lost
    (the 3.11 ``wait_for`` returns the inner result instead), and the command goes on through
    redis-py's reconnects and retries: during a failover a page's 200 ms membership budget
    was seen to last a whole second. So for :data:`GUARDED_S` after a transient error, each
    command runs in a task of its own and the caller waits for it through ``asyncio.shield``:
    the caller's cancellation then always returns at once (the command is cancelled and
    finishes in the background, still holding its connection slot). Outside such episodes
    commands run inline: a task per command would cost ~30 us on the page path.
    """

    def __init__(self, *args: Any, limit: int, **kwargs: Any) -> None:
        kwargs["max_connections"] = limit
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(limit)
        self._guarded_until = 0.0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if time.monotonic() < self._guarded_until:
                return await self._guarded(args, kwargs)
            return await self._bounded(args, kwargs)
        except TRANSIENT_ERRORS:
            self._guarded_until = time.monotonic() + GUARDED_S
            raise

    async def _bounded(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        async with self._slots:
            try:
                return await super().execute_command(*args, **kwargs)
            except AttributeError as exc:
                lost = _closed_under_us(exc)
                if lost is None:
                    raise
                raise lost from exc

    async def _guarded(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The command in a task of its own; the caller's cancellation returns at once."""
        task = asyncio.ensure_future(self._bounded(args, kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_consume_outcome)
            raise

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:  # (as redis-py)
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # (redis-py's ClusterPipeline declares an attribute it sets at run time abstract)
        return BoundedClusterPipeline(self, transaction)  # type: ignore[abstract]

    async def initialize(self, *args: Any, **kwargs: Any) -> BoundedRedisCluster:
        """Discover the cluster; no reachable seed is a ``ConnectionError`` (an outage).

        redis-py raises ``RedisClusterException``, which is not a ``RedisError``: callers that
        degrade or retry on Redis outages would see an unexpected exception instead.
        """
        try:
            await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            if isinstance(exc, SlotNotCoveredError):
                raise
            raise RedisConnectionError(f"Redis Cluster not reachable: {exc}") from exc
        return self
