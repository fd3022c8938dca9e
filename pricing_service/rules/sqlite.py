"""SQLite backend: the embedded default (``sqlite:///path``).

WAL mode, so readers never block the writer and several processes (the server, the CLI, a
benchmark) can open the same file at once. ``synchronous=FULL``: a commit that returned is on
disk, even if the process is killed -9 right after. Writes start with ``BEGIN IMMEDIATE``,
which takes the database's write lock up front (waiting up to the busy timeout), so
cross-process writers are serialised before they read anything.

The stdlib driver is blocking; each connection lives on a single thread of its own and the
event loop hands it statements. One connection writes and a few read (up to
:data:`MAX_READERS`), each guarded by an ``asyncio.Lock`` held for a whole transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TypeVar

from pricing_service.config import Settings
from pricing_service.domain import Clock
from pricing_service.errors import ConfigError, UnavailableError
from pricing_service.rules.sql import Row, Tx
from pricing_service.rules.sql_store import SqlRuleStore

T = TypeVar("T")
#: Reader connections (each on a thread of its own), at most; PRICING_RULE_STORE_POOL_SIZE caps it.
MAX_READERS = 4


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel/path`` or ``sqlite:////abs/path`` → the file path."""
    raw = url.removeprefix("sqlite:///")
    if not raw or raw == ":memory:" or raw.startswith("file:"):
        raise ConfigError(
            f"PRICING_RULE_STORE_URL: {url!r} must name a database file (sqlite:///path); "
            "an in-memory database cannot be shared by the server and other processes"
        )
    return Path(raw)


class _Conn:
    """One sqlite3 connection confined to one thread."""

    def __init__(self, path: Path, busy_timeout_ms: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self._path = path
        self._busy = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self.lock = asyncio.Lock()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        def call() -> T:
            if self._conn is None:
                self._conn = self._connect()
            return fn(self._conn)

        try:
            return await loop.run_in_executor(self._executor, call)
        except sqlite3.OperationalError as exc:
            raise UnavailableError(
                f"rule store (SQLite) unavailable: {exc}", reason="RULE_STORE_UNAVAILABLE"
            ) from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy / 1000,
            isolation_level=None,  # autocommit: transactions are explicit BEGIN/COMMIT
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy)}")
        # Several processes opening a fresh file at once race to switch it to WAL; SQLite can
        # answer "database is locked" at once there (its busy handler is not used for that
        # switch), so retry within the busy timeout.
        deadline = time.monotonic() + self._busy / 1000
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    conn.close()
                    raise
                time.sleep(0.01)
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {self._path} to WAL mode ({mode})")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


class _SqliteTx:
    def __init__(self, conn: _Conn) -> None:
        self._c = conn

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        row: Row | None = await self._c.run(lambda c: c.execute(sql, tuple(params)).fetchone())
        return row

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        rows: list[Row] = await self._c.run(lambda c: c.execute(sql, tuple(params)).fetchall())
        return rows

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        count: int = await self._c.run(lambda c: c.execute(sql, tuple(params)).rowcount)
        return count


class SqliteRuleStore(SqlRuleStore):
    """Rule store in one SQLite file (WAL)."""

    def __init__(self, settings: Settings, clock: Clock | None, path: Path) -> None:
        super().__init__(settings, clock)
        self.path = path
        busy = settings.rule_store_busy_timeout_ms
        self._writer = _Conn(path, busy, "w")
        readers = max(1, min(settings.rule_store_pool_size, MAX_READERS))
        self._readers = [_Conn(path, busy, f"r{i}") for i in range(readers)]
        self._next_reader = 0
        self._closed = False

    @classmethod
    async def open(cls, settings: Settings, clock: Clock | None = None) -> SqliteRuleStore:
        path = sqlite_path(settings.rule_store_url)
        if not path.parent.exists():
            raise ConfigError(
                f"PRICING_RULE_STORE_URL: directory {str(path.parent)!r} does not exist"
            )
        store = cls(settings, clock, path)
        try:
            await store._writer.run(lambda c: None)  # connect now: fail at start-up, not later
        except BaseException:
            await store.close()
            raise
        return store

    @asynccontextmanager
    async def _tx(self, conn: _Conn, begin: str) -> AsyncIterator[Tx]:
        if self._closed:
            raise UnavailableError("rule store is closed", reason="RULE_STORE_CLOSED")
        async with conn.lock:
            await conn.run(lambda c: c.execute(begin))
            try:
                yield _SqliteTx(conn)
            except BaseException:
                await asyncio.shield(conn.run(_rollback))
                raise
            await asyncio.shield(conn.run(lambda c: c.execute("COMMIT")))

    def _write(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx(self._writer, "BEGIN IMMEDIATE")

    def _pick_reader(self) -> _Conn:
        # an idle reader if there is one, else the next in turn (WAL: readers never block
        # the writer nor each other)
        conn = next((c for c in self._readers if not c.lock.locked()), None)
        if conn is None:
            self._next_reader = (self._next_reader + 1) % len(self._readers)
            conn = self._readers[self._next_reader]
        return conn

    def _read(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx(self._pick_reader(), "BEGIN DEFERRED")

    async def _read_all(self, *queries: tuple[str, Sequence[object]]) -> list[list[Row]]:
        """The whole read transaction in one trip to the connection's thread."""
        if self._closed:
            raise UnavailableError("rule store is closed", reason="RULE_STORE_CLOSED")

        def run(c: sqlite3.Connection) -> list[list[Row]]:
            c.execute("BEGIN DEFERRED")
            try:
                return [c.execute(sql, tuple(params)).fetchall() for sql, params in queries]
            finally:
                c.execute("COMMIT")

        conn = self._pick_reader()
        async with conn.lock:
            try:
                return await asyncio.shield(conn.run(run))
            except sqlite3.OperationalError as exc:  # locked past the busy timeout, I/O error
                raise UnavailableError(
                    f"rule store (SQLite) unavailable: {exc}", reason="RULE_STORE_UNAVAILABLE"
                ) from exc

    def _migration_lock(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx(self._writer, "BEGIN IMMEDIATE")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in (self._writer, *self._readers):
            async with conn.lock:
                await conn.close()


def _rollback(c: sqlite3.Connection) -> None:
    if c.in_transaction:
        c.execute("ROLLBACK")
