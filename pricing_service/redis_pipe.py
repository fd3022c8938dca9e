"""A lean, pipelined Redis reader for the serving hot path (one ``HMGET`` per page).

Why it exists: redis-py's asyncio client spends ~40 % of our per-request CPU on the
BatchGetLowestPrice path in Python bookkeeping around one command (pool checkout, retry
wrapper, two timeouts, argument filtering, command packing, response callbacks; measured with
``python -m bench.hotpath`` and py-spy, see docs/BENCHMARKS.md). This client does only what
that path needs: read commands over one connection, pipelined (RESP answers in order, so the
n-th reply belongs to the n-th command), parsed by hiredis. Everything else (writes, Lua,
the strict path, health, the sync worker, Redis Cluster) keeps redis-py.

What callers can rely on, the same as with redis-py:

* failures are ``redis.exceptions.ConnectionError`` / ``TimeoutError`` (both ``RedisError``),
  error replies ``ResponseError``, so the breaker and degrade logic is unchanged;
* each call is bounded by its ``timeout`` (``TimeoutError`` past it; one timer per reader
  serves every waiting call, instead of a timer and a context manager per call) or by the
  caller's own ``asyncio.timeout``/cancellation; a reply that arrives after its caller gave up
  is read and dropped, so later replies still match their commands;
* a connection whose oldest reply is overdue by more than ``socket_timeout`` is taken for hung
  (a stopped Redis, a half-open TCP connection): it is closed, every waiting call fails with
  ``ConnectionError`` and the next call reconnects;
* at most ``max_pending`` commands wait for replies; beyond that a call fails at once (the
  serving path then degrades) instead of queueing without bound while Redis is slow;
* TCP or unix socket, TLS with the same certificate settings as redis-py (``rediss://``),
  ``AUTH`` and ``SELECT`` on connect, bounded by ``socket_connect_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from pricing_service.tracing import Tracing

#: Commands waiting for their replies, across all callers, before new calls fail fast.
DEFAULT_MAX_PENDING = 10_000
#: HMGET field lists whose RESP :meth:`PipelinedReader.hmget` keeps (cleared when full).
MAX_MEMOISED_FIELD_LISTS = 4_096


# --- RESP: the one encoder of commands (also the membership writer's) -----------------------
def encode_bulk(arg: bytes | str) -> bytes:
    """One argument in RESP (a bulk string)."""
    b = arg.encode() if isinstance(arg, str) else arg
    return b"$%d\r\n%b\r\n" % (len(b), b)


def encode_array(n: int) -> bytes:
    """The header of a command of ``n`` arguments (an array of ``n`` bulk strings follows)."""
    return b"*%d\r\n" % n


def encode_command(args: tuple[bytes | str, ...]) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    return encode_array(len(args)) + b"".join(map(encode_bulk, args))


class _Protocol(asyncio.Protocol):
    """One connection: writes commands, matches replies to waiting futures in order."""

    def __init__(self, on_lost: Callable[[_Protocol], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._reader = hiredis.Reader()
        self._on_lost = on_lost
        self.closed = False
        #: commands of this loop iteration not written yet (:meth:`send`)
        self._out: list[bytes] = []

    def send(self, command: bytes) -> None:
        """Queue a command; the commands queued in one iteration of the loop are written
        together when its ready callbacks have run (one ``send`` syscall for the calls a
        batch of RPCs started, instead of one each)."""
        out = self._out
        out.append(command)
        if len(out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            fut, _ = pending.popleft()
            if fut.done():  # its caller gave up (timeout, cancel): drop the late reply
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(ResponseError(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by server'}"))

    def fail(self, exc: Exception) -> None:
        """Close the connection and fail every waiting call with ``exc``."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self._on_lost(self)
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)


class PipelinedReader:
    """See the module docstring. Not thread-safe: one per event loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        tracing: Tracing | None = None,
    ) -> None:
        self.host, self.port, self.path, self.db = host, port, path, db
        self._tracing = tracing  # a span per HMGET round trip (under a recording span)
        self._username, self._password = username, password
        self._ssl = ssl_context
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.max_pending = max_pending
        self._proto: _Protocol | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        # calls with a timeout: (deadline on the loop's clock, sequence, future), a heap
        self._deadlines: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when ``_timer`` fires (loop time)
        self._tails: dict[tuple[bytes | str, ...], bytes] = {}

    @classmethod
    def from_client(
        cls, client: aioredis.Redis, *, tracing: Tracing | None = None
    ) -> PipelinedReader:
        """A reader to the same server, database, credentials and TLS as a redis-py client."""
        pool = client.connection_pool
        kw = dict(pool.connection_kwargs)
        ctx: ssl.SSLContext | None = None
        if issubclass(pool.connection_class, SSLConnection):
            # redis-py's own context from the same ssl_* arguments: identical verification
            ctx = pool.connection_class(**kw).ssl_context.get()
        path = (
            kw.get("path")
            if issubclass(pool.connection_class, UnixDomainSocketConnection)
            else None
        )
        timeout = kw.get("socket_timeout") or 5.0
        return cls(
            host=kw.get("host", "127.0.0.1"),
            port=int(kw.get("port", 6379)),
            path=path,
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            ssl_context=ctx,
            socket_timeout=float(timeout),
            connect_timeout=float(kw.get("socket_connect_timeout") or timeout),
            tracing=tracing,
        )

    @property
    def pending(self) -> int:
        return len(self._proto.pending) if self._proto is not None else 0

    async def hmget(
        self, key: bytes | str, fields: Sequence[bytes | str], *, timeout: float | None = None
    ) -> list[bytes | None]:
        """``HMGET key field...`` (with tracing on, in a span of its own)."""
        names = fields if type(fields) is tuple else tuple(fields)
        if self._tracing is None:
            return await self._hmget(key, names, timeout)
        with self._tracing.redis("HMGET", {"pricing.redis.fields": len(names)}):
            return await self._hmget(key, names, timeout)

    async def _hmget(
        self, key: bytes | str, names: tuple[bytes | str, ...], timeout: float | None
    ) -> list[bytes | None]:
        """The round trip; the encoded field lists are memoised (a page asks for the same few
        field lists again and again: their RESP is half of the command's cost)."""
        tail = self._tails.get(names)
        if tail is None:
            tail = b"".join(map(encode_bulk, names))
            if len(self._tails) >= MAX_MEMOISED_FIELD_LISTS:
                self._tails.clear()
            self._tails[names] = tail
        k = key.encode() if isinstance(key, str) else key
        # encode_array + encode_bulk("HMGET") + encode_bulk(k), in one step (the hot path)
        head = b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n%b\r\n" % (len(names) + 2, len(k), k)
        reply: list[bytes | None] = await self._send(head + tail, timeout)
        return reply

    async def execute(self, *args: bytes | str, timeout: float | None = None) -> Any:
        """Send one command, wait for its reply: at most ``timeout`` seconds (then
        ``TimeoutError``, as from ``asyncio.timeout``), and no longer than the caller waits."""
        return await self._send(encode_command(args), timeout)

    async def _send(self, command: bytes, timeout: float | None) -> Any:
        """:meth:`execute` of a command already in RESP."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        proto = self._proto
        if proto is None or proto.closed:
            # (re)connecting counts against the call's timeout too: an unreachable Redis must
            # not hold a page for the connect timeout
            async with asyncio.timeout_at(deadline):
                proto = await self._connect()
        pending = proto.pending
        now = time.monotonic()
        if pending:
            if now - pending[0][1] > self.socket_timeout:
                proto.fail(
                    RedisTimeoutError(
                        f"no reply from Redis for {self.socket_timeout:g} s; connection closed"
                    )
                )
                raise RedisTimeoutError("Redis did not answer in time")
            if len(pending) >= self.max_pending:
                raise RedisConnectionError(
                    f"{len(pending)} Redis commands already waiting for replies"
                )
        fut: asyncio.Future[Any] = loop.create_future()
        pending.append((fut, now))
        proto.send(command)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), fut))
            timer = self._timer
            if timer is None or deadline < self._timer_at:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._expire)
                self._timer_at = deadline
        return await fut

    def _expire(self) -> None:
        """Fail the calls whose timeout has passed; re-arm for the next one still waiting."""
        self._timer = None
        heap = self._deadlines
        loop = asyncio.get_running_loop()
        now = loop.time()
        while heap and (heap[0][2].done() or heap[0][0] <= now):
            _, _, fut = heapq.heappop(heap)
            if not fut.done():  # its reply, when it comes, is dropped (the future is done)
                fut.set_exception(TimeoutError("Redis did not answer within the call's timeout"))
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._expire)

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("the reader is closed")
        async with self._lock:
            proto = self._proto
            if proto is not None and not proto.closed:
                return proto  # another caller connected meanwhile
            loop = asyncio.get_running_loop()
            new = _Protocol(self._lost)
            where = self.path or f"{self.host}:{self.port}"
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if self.path:
                        await loop.create_unix_connection(lambda: new, self.path, ssl=self._ssl)
                    else:
                        await loop.create_connection(
                            lambda: new,
                            self.host,
                            self.port,
                            ssl=self._ssl,
                            server_hostname=self.host if self._ssl else None,
                        )
                    self._proto = new
                    if self._password is not None:
                        auth = (
                            (self._username, self._password)
                            if self._username
                            else (self._password,)
                        )
                        await self.execute(b"AUTH", *auth)
                    if self.db:
                        await self.execute(b"SELECT", str(self.db))
            except TimeoutError as exc:
                new.fail(RedisTimeoutError(f"connecting to Redis at {where} timed out"))
                raise RedisTimeoutError(f"connecting to Redis at {where} timed out") from exc
            except (OSError, ssl.SSLError) as exc:
                new.fail(RedisConnectionError(str(exc)))
                raise RedisConnectionError(f"cannot connect to Redis at {where}: {exc}") from exc
            except ResponseError as exc:  # AUTH or SELECT refused: a configuration problem
                new.fail(RedisConnectionError(str(exc)))
                raise RedisConnectionError(
                    f"Redis at {where} refused the connection: {exc}"
                ) from exc
            except asyncio.CancelledError:
                # the caller gave up (its timeout, its deadline) mid-way: a connection made but
                # not yet through AUTH/SELECT must not serve the next call
                new.fail(RedisConnectionError(f"connecting to Redis at {where} was interrupted"))
                raise
            return new

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def aclose(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proto = self._proto
        if proto is not None:
            proto.fail(RedisConnectionError("the reader is closed"))


class ClientReader(PipelinedReader):
    """The page's reads through a redis-py client instead of a connection of its own: on Redis
    Cluster (slot routing, redirections and failover stay redis-py's), where the server uses it
    only with tracing on, for the ``HMGET`` span the pipelined reader has."""

    def __init__(self, client: aioredis.Redis, *, tracing: Tracing | None = None) -> None:
        super().__init__(tracing=tracing)
        self._client = client

    async def _hmget(
        self, key: bytes | str, names: tuple[bytes | str, ...], timeout: float | None
    ) -> list[bytes | None]:
        reply: list[bytes | None] = await self.execute(b"HMGET", key, *names, timeout=timeout)
        return reply

    async def execute(self, *args: bytes | str, timeout: float | None = None) -> Any:
        name = args[0].decode() if isinstance(args[0], bytes) else args[0]
        async with asyncio.timeout(timeout):
            return await self._client.execute_command(name, *args[1:])  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        """Nothing of its own to close (the client is its owner's)."""
