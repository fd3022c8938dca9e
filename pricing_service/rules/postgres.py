"""PostgreSQL backend: the production store shared by every replica (``postgresql://...``).

psycopg 3 async with an ``AsyncConnectionPool``. Connections run in autocommit mode and every
transaction is explicit:

* writes: ``BEGIN`` (READ COMMITTED) then ``SELECT ... FROM rule_meta ... FOR UPDATE``: the
  revision row lock serialises writers of all replicas, so revisions are committed in order
  and the change feed never skips one (see :mod:`pricing_service.rules.sql`);
* reads: ``BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY``: one snapshot, so e.g.
  ``load_all`` returns rules and the revision they reflect, consistently;
* migrations: a transaction holding ``pg_advisory_xact_lock`` (PostgreSQL DDL is
  transactional), so replicas starting together migrate once.

The schema comes from the connection's ``search_path`` (e.g. ``?options=-csearch_path%3Dx``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pricing_service.config import Settings
from pricing_service.domain import Clock
from pricing_service.errors import UnavailableError
from pricing_service.rules.sql import Row, Tx
from pricing_service.rules.sql_store import SqlRuleStore

MIGRATION_LOCK_SQL = (
    "SELECT pg_advisory_xact_lock(hashtext('pricing-rules-migrate:' || current_schema()))"
)


@lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """Shared SQL uses ``?`` placeholders; psycopg wants ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        cur = await self._conn.execute(_pg(sql), tuple(params))
        row: Row | None = await cur.fetchone()
        return row

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        cur = await self._conn.execute(_pg(sql), tuple(params))
        rows: list[Row] = await cur.fetchall()
        return rows

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        cur = await self._conn.execute(_pg(sql), tuple(params))
        return cur.rowcount


#: How long one reconnect attempt of the pool keeps backing off (psycopg_pool doubles its delay
#: from 1 s, for 5 min by default) before it gives up; the next read that finds no connection
#: starts a new one at once. Bounds the time to use PostgreSQL again once it is back to ~1 s,
#: whatever the outage's length (with the default it grew with the outage: 1.6-5.8 s after
#: 10-12 s down; docs/benchmarks/rules.md, "Recovery after a PostgreSQL outage").
RECONNECT_TIMEOUT_S = 2.0


class PostgresRuleStore(SqlRuleStore):
    """Rule store in PostgreSQL, through a connection pool."""

    LOCK_REVISION_SQL = "SELECT revision FROM rule_meta WHERE id = 1 FOR UPDATE"

    def __init__(self, settings: Settings, clock: Clock | None, pool: AsyncConnectionPool) -> None:
        super().__init__(settings, clock)
        self._pool = pool
        self._timeout_s = max(settings.rule_store_busy_timeout_ms / 1000, 0.1)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        clock: Clock | None = None,
        *,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
    ) -> PostgresRuleStore:
        timeout = max(settings.rule_store_busy_timeout_ms / 1000, 1.0)
        pool = AsyncConnectionPool(
            settings.rule_store_url,
            min_size=1,
            max_size=settings.rule_store_pool_size,
            kwargs={"autocommit": True},
            timeout=timeout,
            name="rule-store",
            reconnect_timeout=reconnect_timeout_s,
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            await pool.close()
            raise UnavailableError(
                "rule store (PostgreSQL) unreachable at start-up", reason="RULE_STORE_UNAVAILABLE"
            ) from exc
        return cls(settings, clock, pool)

    @asynccontextmanager
    async def _tx(self, begin: str, first: str | None = None) -> AsyncIterator[Tx]:
        try:
            async with self._pool.connection() as conn:
                await conn.execute(begin)
                try:
                    if first is not None:
                        await conn.execute(first)
                    yield _PgTx(conn)
                except BaseException:
                    if not conn.closed:
                        await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise UnavailableError(
                f"rule store (PostgreSQL) unavailable: {exc}", reason="RULE_STORE_UNAVAILABLE"
            ) from exc

    def _write(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx("BEGIN")

    def _read(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _migration_lock(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx("BEGIN", MIGRATION_LOCK_SQL)

    async def close(self) -> None:
        await self._pool.close()
