"""Transient Redis errors and the one retry policy for them (both processes use it).

:data:`TRANSIENT_ERRORS` is the one list of errors that mean "this part of Redis is unreachable
or changing hands right now: try again later". :class:`Outage` is the policy for riding one out:
capped exponential backoff with jitter, one ``redis_unavailable`` log line when an outage
starts and one ``redis_recovered`` when it ends. :func:`retrying` applies it to one operation
with a time limit. No I/O of its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import structlog
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing_service.errors import UnavailableError

log = structlog.get_logger("pricing_service.redis_errors")

T = TypeVar("T")

#: Errors that mean "this part of Redis is unreachable or changing hands right now": retry
#: later. Besides connection errors and timeouts, a cluster answers ``CLUSTERDOWN`` while a
#: failed master is not yet replaced, ``TRYAGAIN`` during a slot migration, and a slot may be
#: briefly uncovered in the client's map.
TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    AskError,  # MovedError is a subclass; left over only when a redirection itself failed
    # "TTL exhausted": redirections did not settle. Seen while a slot migrates: redis-py's
    # async cluster sends ASKING and the redirected command on different pooled
    # connections, so ASK is not honoured until the slot has moved (then MOVED works).
    ClusterError,
    # "READONLY You can't write against a read only replica": a write that reached a master
    # in the moment it was demoted (failover), before the client learnt the new topology
    ReadOnlyError,
    ConnectionError,
    OSError,
)

#: Backoff: ``min(BASE * 2**attempt, CAP)`` seconds, times a jitter factor in ``[0.5, 1)``.
BACKOFF_BASE_S: Final = 0.05
BACKOFF_CAP_S: Final = 2.0


def backoff_s(attempt: int) -> float:
    """The pause after the ``attempt``-th failure in a row (1, 2, ...)."""
    delay: float = min(BACKOFF_BASE_S * 2 ** min(attempt, 10), BACKOFF_CAP_S)
    return delay * random.uniform(0.5, 1.0)


class Outage:
    """The state of one Redis outage as a retry loop sees it.

    Call :meth:`failed` on every transient error (it logs ``redis_unavailable`` on the first of
    an outage and returns the pause before the next try) and :meth:`recovered` after every
    success (it logs ``redis_recovered`` once, when an outage ends).
    """

    def __init__(self) -> None:
        self.since: float | None = None
        self.attempts = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def elapsed_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def failed(self, exc: BaseException, **fields: Any) -> float:
        """Count a failure; ``fields`` go into the ``redis_unavailable`` line. Returns the pause."""
        if self.since is None:
            self.since = time.monotonic()
            self.attempts = 0
            log.warning("redis_unavailable", error=f"{type(exc).__name__}: {exc}", **fields)
        self.attempts += 1
        return backoff_s(self.attempts)

    def recovered(self) -> None:
        if self.since is not None:
            log.info(
                "redis_recovered",
                outage_ms=round((time.monotonic() - self.since) * 1000),
                attempts=self.attempts,
            )
            self.since = None


async def retrying(op: Callable[[], Awaitable[T]], give_up_s: float, *, resume_hint: str) -> T:
    """Run ``op``; on a transient error retry it under :class:`Outage`, up to ``give_up_s`` of
    outage, then raise UNAVAILABLE (``REDIS_UNAVAILABLE``) whose message ends in ``resume_hint``."""
    outage = Outage()
    while True:
        try:
            result = await op()
        except TRANSIENT_ERRORS as exc:
            if outage.active and outage.elapsed_s() > give_up_s:
                raise UnavailableError(
                    f"Redis unreachable for {give_up_s:.0f}s; {resume_hint}",
                    reason="REDIS_UNAVAILABLE",
                ) from exc
            await asyncio.sleep(outage.failed(exc))
            continue
        outage.recovered()
        return result
