"""The SQL implementation's base: transactions, the revision lock, the schema, the feeds.

Both backends (:mod:`pricing_service.rules.sqlite`, :mod:`pricing_service.rules.postgres`)
only provide transactions (:class:`Tx`) through the hooks of :class:`SqlBase`; every rule,
crowd, revision and audit decision is made in the two halves built on it, once, so the two
backends behave the same (one contract test suite runs against both): the crowd half
:mod:`pricing_service.rules.crowd_store` and the rule half
:mod:`pricing_service.rules.sql_store` (:class:`~pricing_service.rules.sql_store.SqlRuleStore`,
the class the backends subclass).

Revisions. ``rule_meta.revision`` is the store-wide revision. A write transaction locks that
row first (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so writers
are serialised and *commit order equals revision order*: a reader that has seen revision R can
never later find a newly committed change with a revision <= R. Each changed rule takes the
next revision and writes one ``rule_changes`` row (the change feed and the audit trail); a
no-op upsert writes nothing and takes no revision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from pricing_service.config import Settings
from pricing_service.domain import Clock, SystemClock
from pricing_service.errors import ConfigError
from pricing_service.rules.migrations import (
    CREATE_MIGRATIONS_TABLE,
    LATEST_VERSION,
    MIGRATIONS,
)
from pricing_service.rules.tokens import decode_token, encode_token, malformed_token

Row = tuple[Any, ...]


class Tx(Protocol):
    """One open transaction of a backend. SQL uses ``?`` placeholders."""

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int: ...


class SqlBase(ABC):
    """Everything but the connection handling and the records; subclasses provide
    transactions."""

    #: SQL that reads and locks the revision counter inside a write transaction.
    LOCK_REVISION_SQL = "SELECT revision FROM rule_meta WHERE id = 1"

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.max_rules_per_item = settings.max_rules_per_item
        self.max_crowds_per_seller = settings.max_crowds_per_seller

    # backend hooks
    @abstractmethod
    def _write(self) -> AbstractAsyncContextManager[Tx]:
        """A serialised read-write transaction (committed on success, rolled back on error)."""

    @abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Tx]:
        """A read-only transaction on one consistent snapshot."""

    @abstractmethod
    def _migration_lock(self) -> AbstractAsyncContextManager[Tx]:
        """A transaction that holds the store's migration lock (DDL allowed)."""

    @abstractmethod
    async def close(self) -> None: ...

    async def _read_all(self, *queries: tuple[str, Sequence[object]]) -> list[list[Row]]:
        """Every query's rows, all from one snapshot (one read-only transaction)."""
        async with self._read() as tx:
            return [await tx.fetchall(sql, params) for sql, params in queries]

    async def _lock_revision(self, tx: Tx) -> int:
        row = await tx.fetchone(self.LOCK_REVISION_SQL)
        if row is None:
            raise ConfigError(
                "rule store is not migrated (no rule_meta row)", reason="NOT_MIGRATED"
            )
        return int(row[0])

    # --- schema ---------------------------------------------------------------------------
    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._migration_lock() as tx:
            await tx.execute(CREATE_MIGRATIONS_TABLE)
            row = await tx.fetchone("SELECT MAX(version) FROM schema_migrations")
            current = int(row[0]) if row and row[0] is not None else 0
            if current > LATEST_VERSION:
                raise ConfigError(
                    f"the rule store's schema is at version {current}, newer than this program "
                    f"knows ({LATEST_VERSION}); upgrade the program",
                    reason="SCHEMA_TOO_NEW",
                )
            for m in MIGRATIONS:
                if m.version <= current:
                    continue
                for statement in m.statements:
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (?, ?, ?)",
                    (m.version, m.name, self.clock.now_ms()),
                )
                applied.append(m.version)
        return applied

    async def schema_version(self) -> int:
        [rows] = await self._read_all(("SELECT MAX(version) FROM schema_migrations", ()))
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    # --- the change feeds (rules and crowds alike) ------------------------------------------
    async def _revision(self, meta: str) -> int:
        """The revision counter of ``meta`` (``rule_meta``, ``crowd_meta``)."""
        [rows] = await self._read_all((f"SELECT revision FROM {meta} WHERE id = 1", ()))
        return int(rows[0][0]) if rows else 0

    async def _feed(self, table: str, columns: str, revision: int, limit: int) -> list[Row]:
        """A feed's entries after ``revision``, oldest first (``columns`` start with it)."""
        [rows] = await self._read_all(
            (
                f"SELECT {columns} FROM {table} WHERE revision > ? ORDER BY revision LIMIT ?",
                (revision, limit),
            )
        )
        return rows

    async def _history(
        self,
        table: str,
        columns: str,
        where: Sequence[tuple[str, str]],
        page_size: int,
        page_token: str,
        tag: Sequence[str],
    ) -> tuple[list[Row], str]:
        """A page of a feed's entries whose (column, value) pairs are ``where``, newest first:
        keyset pages on the revision (``columns`` start with it), tokens tagged ``tag``."""
        clauses = [f"{column} = ?" for column, _ in where]
        params: list[object] = [value for _, value in where]
        if page_token:
            pos = decode_token(page_token, *tag)
            if len(pos) != 1 or not isinstance(pos[0], int):
                raise malformed_token()
            clauses.append("revision < ?")
            params.append(pos[0])
        params.append(page_size + 1)
        [rows] = await self._read_all(
            (
                f"SELECT {columns} FROM {table} WHERE {' AND '.join(clauses)}"
                " ORDER BY revision DESC LIMIT ?",
                params,
            )
        )
        page = rows[:page_size]
        token = ""
        if len(rows) > page_size:
            token = encode_token([int(page[-1][0])], *tag)
        return page, token
