"""Redis client construction: one place, explicit timeouts, standalone or Redis Cluster.

``PRICING_REDIS_URL`` selects the deployment:

* ``redis://``, ``rediss://``, ``unix://`` - one Redis (a blocking connection pool);
* ``redis+cluster://[user[:password]@]host:port[,host:port...]`` - a Redis Cluster, given by
  one or more seed nodes; the client discovers the rest (``CLUSTER SLOTS``) and follows
  ``MOVED``/``ASK`` redirections and failovers by itself;
* ``rediss+cluster://...`` (same seeds) - the same over TLS to every node, with the CA and
  client certificate of ``rediss://`` (``PRICING_REDIS_TLS_CA_FILE``, ``..._CERT_FILE``,
  ``..._KEY_FILE``); the nodes' certificates must name the addresses the cluster announces.

Both return a client with the same command API: every key this service uses is single-slot
(per-buyer hash tags), pipelines are split by node by the cluster client, ``SCRIPT LOAD`` goes
to every primary, and a ``NOSCRIPT`` after a failover is answered by the callers' reload.
Writes acknowledged by a replica (``WAIT``): :mod:`pricing_service.replica_acks`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    RedisClusterException,
    SlotNotCoveredError,
)

from pricing_service.config import CLUSTER_SCHEMES, ClusterSeeds, Settings, parse_cluster_seeds
from pricing_service.errors import ConfigError
from pricing_service.redis_errors import TRANSIENT_ERRORS


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def parse_cluster_url(url: str) -> ClusterSeeds:
    """``redis[s]+cluster://[user[:password]@]host:port[,host:port...]`` (ConfigError if not)."""
    try:
        return parse_cluster_seeds(url)
    except ValueError as exc:
        raise ConfigError(f"PRICING_REDIS_URL: {exc}") from None


def tls_options(settings: Settings) -> dict[str, object]:
    """redis-py's ``ssl_*`` arguments from the ``PRICING_REDIS_TLS_*`` files (those set)."""
    options = {
        "ssl_ca_certs": settings.redis_tls_ca_file,
        "ssl_certfile": settings.redis_tls_cert_file,
        "ssl_keyfile": settings.redis_tls_key_file,
    }
    return {k: v for k, v in options.items() if v is not None}


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


def make_redis(
    settings: Settings, *, socket_timeout_ms: int | None = None, max_connections: int | None = None
) -> aioredis.Redis:
    """An asyncio Redis client with explicit timeouts (never the library defaults).

    ``socket_timeout_ms`` must exceed any blocking command's block time (XREADGROUP BLOCK):
    redis-py 8 defaults to 5 s, which breaks long blocking reads.

    For a ``redis[s]+cluster://`` URL the client is a :class:`redis.asyncio.RedisCluster`
    (:class:`BoundedRedisCluster`); it has the same command and pipeline API as
    :class:`redis.asyncio.Redis` for everything this service sends, and is typed as such so
    the callers need not care. ``max_connections`` is then the limit per node. Code that
    needs a standalone-only attribute uses the helpers below (:func:`is_cluster`,
    :func:`socket_timeout_s`).
    """
    timeout = (socket_timeout_ms or settings.redis_socket_timeout_ms) / 1000
    connect_timeout = settings.redis_connect_timeout_ms / 1000
    limit = max_connections or settings.redis_max_connections
    if is_cluster_url(settings.redis_url):
        seeds = parse_cluster_url(settings.redis_url)
        client = BoundedRedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in seeds.nodes],
            username=seeds.username,
            password=seeds.password,
            **({"ssl": True, **tls_options(settings)} if seeds.tls else {}),
            limit=limit,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=30,
            # redirections and topology refreshes are the client's; a few quick retries ride
            # over a replica's promotion, longer outages reach the caller (which retries or
            # degrades by its own policy)
            retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), 3),
            # on MOVED patch the one slot in the map; a full refresh (redis-py closes every
            # connection of the client for it) would break the commands other tasks have in
            # flight on those connections
            reinitialize_steps=0,
        )
        return cast(aioredis.Redis, client)
    tls = tls_options(settings) if settings.redis_url.startswith("rediss://") else {}
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=limit,
        timeout=timeout,  # wait for a free connection at most this long
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=30,
        # one immediate retry on a fresh connection: after a Redis restart every pooled
        # connection is dead, and the first use of each must not fail the caller
        retry=Retry(NoBackoff(), 1),
        **tls,
    )
    return aioredis.Redis(connection_pool=pool)


def is_cluster(client: object) -> bool:
    return isinstance(client, aioredis.RedisCluster)


def socket_timeout_s(client: aioredis.Redis) -> float | None:
    """The client's socket read timeout (seconds), standalone or cluster."""
    if is_cluster(client):
        kwargs = cast(aioredis.RedisCluster, client).get_connection_kwargs()
    else:
        kwargs = client.connection_pool.connection_kwargs
    value = kwargs.get("socket_timeout")
    return float(value) if value is not None else None
