"""Redis client construction: one place, explicit timeouts, a blocking pool."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pricing_service.config import Settings


def make_redis(
    settings: Settings, *, socket_timeout_ms: int | None = None, max_connections: int | None = None
) -> aioredis.Redis:
    """An asyncio Redis client with explicit timeouts (never the library defaults).

    ``socket_timeout_ms`` must exceed any blocking command's block time (XREADGROUP BLOCK):
    redis-py 8 defaults to 5 s, which breaks long blocking reads.
    """
    timeout = (socket_timeout_ms or settings.redis_socket_timeout_ms) / 1000
    tls: dict[str, object] = {}
    if settings.redis_url.startswith("rediss://"):
        tls = {
            "ssl_ca_certs": settings.redis_tls_ca_file,
            "ssl_certfile": settings.redis_tls_cert_file,
            "ssl_keyfile": settings.redis_tls_key_file,
        }
        tls = {k: v for k, v in tls.items() if v is not None}
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=timeout,  # wait for a free connection at most this long
        socket_timeout=timeout,
        socket_connect_timeout=settings.redis_connect_timeout_ms / 1000,
        health_check_interval=30,
        # one immediate retry on a fresh connection: after a Redis restart every pooled
        # connection is dead, and the first use of each must not fail the caller
        retry=Retry(NoBackoff(), 1),
        **tls,
    )
    return aioredis.Redis(connection_pool=pool)
