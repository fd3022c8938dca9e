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
The cluster client's workarounds for redis-py: :mod:`pricing_service.redis_cluster`; writes
acknowledged by a replica (``WAIT``): :mod:`pricing_service.replica_acks`.
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from pricing_service.config import CLUSTER_SCHEMES, ClusterSeeds, Settings, parse_cluster_seeds
from pricing_service.errors import ConfigError
from pricing_service.redis_cluster import BoundedRedisCluster


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
