"""Membership store: atomic versioned writes and one-round-trip page lookups in Redis."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing_service.domain import Clock, Crowd, CrowdKind
from pricing_service.membership.derive import MembershipWrite
from pricing_service.membership.layout import (
    APPLY_LUA,
    APPLY_SAME_VALUE_LUA,
    EPOCH_MS,
    MAX_VERSION_MS,
    LayoutError,
    MembershipLayout,
    Record,
)
from pricing_service.redis_client import TRANSIENT_ERRORS, is_cluster
from pricing_service.redis_pipe import PipelinedReader

#: Encoded write arguments memoised by the standalone write path (cleared when full). Fields
#: and a snapshot's one value repeat; a stream event's value is unique, so a large memo only
#: holds dead entries: at 100,000 the 30-minute soak saw the worker's RSS climb ~10 MB.
RESP_CACHE_SIZE = 16_384
#: Crowd fields memoised by :meth:`MembershipStore.member_keys` (cleared when full).
FIELD_CACHE_SIZE = 65_536
#: Decoded values memoised by :meth:`MembershipStore.member_keys` (cleared when full). Every
#: membership a snapshot wrote carries the same value (its cut and TTL), so the few values of
#: the latest snapshots cover most fields read; an event's value is unique and only churns it.
VALUE_CACHE_SIZE = 4_096
#: A memoised value that is not a membership (a tombstone): expired at every time.
_NOT_MEMBER = -1


class AnomalySink(Protocol):
    """Receives counts of reads that found something unexpected (metric hook)."""

    def membership_anomaly(self, reason: str) -> None: ...


@dataclass(slots=True)
class ApplyResult:
    """What a batch of writes did."""

    applied: int = 0
    stale: int = 0
    condition_unmet: int = 0
    failed_users: dict[str, str] = field(default_factory=dict)

    def add(self, other: ApplyResult) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.condition_unmet += other.condition_unmet
        self.failed_users.update(other.failed_users)


def group_writes(writes: Iterable[MembershipWrite], by_user: dict[str, list[str]]) -> int:
    """Append the Lua ARGV triples of ``writes`` to ``by_user`` (by buyer, in order).

    Returns the number of writes dropped because their version is outside the layout's range
    (older than its epoch: long expired under any TTL); they are counted as stale.
    """
    expired = 0
    field_of = MembershipLayout.crowd_field
    encode = MembershipLayout.encode
    for w in writes:
        if w.version_ms <= EPOCH_MS or w.version_ms > MAX_VERSION_MS:
            expired += 1
            continue
        args = by_user.get(w.user_id)
        if args is None:
            args = by_user[w.user_id] = []
        args.append(field_of(w.crowd))
        args.append(encode(w.version_ms, w.expires_ms, tombstone=w.tombstone))
        args.append(field_of(w.requires) if w.requires is not None else "")
    return expired


def base_crowd(crowd: Crowd) -> Crowd:
    """The all_fans crowd of the same seller: every crowd kind implies following."""
    return Crowd(crowd.seller_id, CrowdKind.ALL_FANS)


class MembershipStore:
    """The only reader and writer of membership keys (layout in :mod:`.layout`)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: MembershipLayout,
        clock: Clock,
        anomalies: AnomalySink | None = None,
        *,
        reader: PipelinedReader | None = None,
    ) -> None:
        self.redis = redis
        #: the hot path's lean pipelined reader (standalone Redis); None = redis-py for reads
        self.reader = reader
        self.layout = layout
        self.clock = clock
        self._sink = anomalies
        self.anomaly_counts: collections.Counter[str] = collections.Counter()
        self._script = APPLY_LUA
        self._sha: str | None = None
        self._sha_same: str | None = None  # APPLY_SAME_VALUE_LUA
        self._fields: dict[tuple[str, CrowdKind], bytes] = {}
        self._expiries: dict[bytes, int] = {}
        self._resp: dict[str, bytes] = {}

    # --- writes --------------------------------------------------------------------------
    async def load_script(self) -> str:
        """Load both write scripts (on every primary of a cluster); return APPLY_LUA's sha."""
        sha = await self.redis.script_load(self._script)
        same = await self.redis.script_load(APPLY_SAME_VALUE_LUA)
        self._sha_same = same.decode() if isinstance(same, bytes) else str(same)
        self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        return self._sha

    def _args_by_user(self, writes: Iterable[MembershipWrite]) -> tuple[dict[str, list[str]], int]:
        by_user: dict[str, list[str]] = {}
        return by_user, group_writes(writes, by_user)

    async def apply(self, writes: Iterable[MembershipWrite]) -> ApplyResult:
        """Apply writes (any buyers, any order) in one pipeline: one Lua call per buyer.

        Idempotent and commutative: replaying a batch, or applying batches out of order, ends
        in the same state. Buyers whose key cannot be written (wrong type) are reported in
        ``failed_users`` and the rest still apply.
        """
        by_user, expired = self._args_by_user(writes)
        return await self.apply_args(by_user, stale=expired)

    async def apply_args(
        self, by_user: Mapping[str, Sequence[str]], *, stale: int = 0
    ) -> ApplyResult:
        """:meth:`apply` of writes already grouped and encoded by buyer (:func:`group_writes`,
        :class:`~pricing_service.membership.derive.SnapshotEncoder`): ``by_user[user]`` is the
        Lua ARGV triples (field, value, condition field or ``''``) of the buyer's writes, in
        order. ``stale`` (writes dropped while encoding) is added to the result's count.
        """
        return await self._apply_calls(by_user, stale, None)

    async def apply_same_value(
        self, by_user: Mapping[str, Sequence[str]], value: str, *, stale: int = 0
    ) -> ApplyResult:
        """:meth:`apply_args` of unconditional writes that all carry the encoded ``value`` (a
        snapshot's, :class:`~pricing_service.membership.derive.SnapshotEncoder`):
        ``by_user[user]`` is just the fields. Same result as triples ``(field, value, '')``
        through :data:`APPLY_LUA`, with a third of the arguments (:data:`APPLY_SAME_VALUE_LUA`).
        """
        return await self._apply_calls(by_user, stale, value)

    async def _apply_calls(
        self, by_user: Mapping[str, Sequence[str]], stale: int, same_value: str | None
    ) -> ApplyResult:
        result = ApplyResult(stale=stale)
        if not by_user:
            return result
        if self._sha is None or self._sha_same is None:
            await self.load_script()
        users = list(by_user)
        send = self._send_pipeline if is_cluster(self.redis) else self._send_packed
        for attempt in range(2):
            if same_value is None:
                replies = await send(users, by_user, self._sha or "", ())
            else:
                replies = await send(users, by_user, self._sha_same or "", (same_value,))
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted, SCRIPT FLUSH, or (cluster) a replica promoted since the load:
                # reload on every primary, replay all (the writes are idempotent)
                await self.load_script()
                continue
            break
        for reply in replies:
            # Redis Cluster returns a node's failure (down, failing over, slot migrating) as a
            # reply of its commands; it is an outage for the caller to retry, not a per-buyer
            # failure (standalone Redis raises the same errors from execute()).
            if isinstance(reply, TRANSIENT_ERRORS):
                raise reply
        applied = stale_n = unmet = 0
        for user, reply in zip(users, replies, strict=True):
            if isinstance(reply, Exception):
                result.failed_users[user] = str(reply)
                continue
            applied += int(reply[0])
            stale_n += int(reply[1])
            unmet += int(reply[2])
        result.applied += applied
        result.stale += stale_n
        result.condition_unmet += unmet
        return result

    async def _send_pipeline(
        self,
        users: list[str],
        by_user: Mapping[str, Sequence[str]],
        sha: str,
        lead: tuple[str, ...],
    ) -> list[Any]:
        """One EVALSHA per buyer through a redis-py pipeline (Redis Cluster: split by node);
        ARGV = now, ``lead``, the buyer's arguments."""
        now_off = str(self.clock.now_ms() - EPOCH_MS)
        pipe = self.redis.pipeline(transaction=False)
        user_key = self.layout.user_key
        for user in users:
            # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the
            # evalsha method (not the command), and this is the same command standalone
            pipe.execute_command("EVALSHA", sha, 1, user_key(user), now_off, *lead, *by_user[user])
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _bulk(self, arg: str) -> bytes:
        """RESP bulk string of an argument, memoised (fields and snapshot values repeat)."""
        b = self._resp.get(arg)
        if b is None:
            raw = arg.encode()
            b = b"$%d\r\n%s\r\n" % (len(raw), raw)
            if len(self._resp) >= RESP_CACHE_SIZE:
                self._resp.clear()
            self._resp[arg] = b
        return b

    @staticmethod
    async def _read_replies(conn: Any, n: int) -> list[Any]:
        """``n`` replies in order; an error reply is returned in its place.

        The socket timeout applies to the silence between replies, as in redis-py, but is
        re-armed every 256 replies rather than per reply (a timer per reply cost more than the
        parsing). On a timeout, cancellation or I/O error redis-py closes the connection, so it
        is never reused with replies still due.
        """
        timeout: float | None = conn.socket_timeout or None
        loop = asyncio.get_running_loop()
        replies: list[Any] = []
        add = replies.append
        read = conn.read_response
        try:
            async with asyncio.timeout(timeout) as cm:
                for i in range(n):
                    try:
                        add(await read(timeout=math.inf))  # no per-read timer (see above)
                    except ResponseError as exc:
                        add(exc)
                    if timeout is not None and not i & 255:
                        cm.reschedule(loop.time() + timeout)
        except TimeoutError:
            raise RedisTimeoutError("Timeout reading EVALSHA replies") from None
        return replies

    async def _send_packed(
        self,
        users: list[str],
        by_user: Mapping[str, Sequence[str]],
        sha: str,
        lead: tuple[str, ...],
    ) -> list[Any]:
        """Standalone Redis: the same EVALSHAs as :meth:`_send_pipeline`, packed here.

        redis-py's generic packing costs about 2 us per membership; this encodes each distinct
        argument once (:meth:`_bulk`), sends the batch in one write on one pooled connection
        and reads the replies in order (an error reply is that buyer's result). A connection
        error or timeout is retried once on a fresh connection (as the client's own retry
        policy does: the writes are idempotent), then raised.
        """
        now_raw = str(self.clock.now_ms() - EPOCH_MS).encode()
        sha_b = sha.encode()
        head = b"$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(sha_b), sha_b)
        now_b = b"$%d\r\n%s\r\n" % (len(now_raw), now_raw) + b"".join(map(self._bulk, lead))
        fixed = 5 + len(lead)  # EVALSHA sha numkeys key now + lead
        user_key = self.layout.user_key
        bulk = self._bulk
        resp = self._resp
        chunks: list[bytes] = []
        add = chunks.append
        for user in users:
            args = by_user[user]
            key = user_key(user).encode()
            add(b"*%d\r\n%s$%d\r\n%s\r\n%s" % (len(args) + fixed, head, len(key), key, now_b))
            for a in args:
                add(resp.get(a) or bulk(a))
        payload = b"".join(chunks)
        pool = self.redis.connection_pool
        for attempt in range(2):
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.send_packed_command(payload)
                return await self._read_replies(conn, len(users))
            except (RedisConnectionError, RedisTimeoutError):
                # the connection was closed by redis-py (it never goes back with replies due)
                if attempt:
                    raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    # --- reads ---------------------------------------------------------------------------
    def _anomaly(self, reason: str) -> None:
        self.anomaly_counts[reason] += 1
        if self._sink is not None:
            self._sink.membership_anomaly(reason)

    async def raw_records(
        self, user_id: str, crowds: Sequence[Crowd], *, redis: aioredis.Redis | None = None
    ) -> list[bytes | None]:
        """One ``HMGET`` for all ``crowds`` (``None`` where there is no field).

        A key of the wrong type reads as all ``None`` (anomaly ``wrong_type``); a reply with no
        field at all - nearly always a missing key: a buyer without memberships, or lost data -
        is counted as ``no_record``. Every other Redis error (connection refused, timeout, ...)
        propagates: the caller decides whether to degrade or refuse.
        """
        if not crowds:
            return []
        field_of = self.layout.crowd_field
        return await self._hmget(user_id, [field_of(c) for c in crowds], redis)

    async def _hmget(
        self,
        user_id: str,
        fields: Sequence[str | bytes],
        redis: aioredis.Redis | None,
        timeout_s: float | None = None,
    ) -> list[bytes | None]:
        """The ``HMGET`` of :meth:`raw_records`, by field, with its anomaly accounting;
        ``TimeoutError`` past ``timeout_s``."""
        reader = self.reader
        values: list[bytes | None]
        try:
            if redis is None and reader is not None:
                values = await reader.hmget(
                    self.layout.user_key(user_id), fields, timeout=timeout_s
                )
            else:
                async with asyncio.timeout(timeout_s):
                    values = await (redis or self.redis).hmget(  # type: ignore[assignment]
                        self.layout.user_key(user_id), fields
                    )
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                self._anomaly("wrong_type")
                return [None] * len(fields)
            raise
        if all(v is None for v in values):
            self._anomaly("no_record")
        return values

    def _field(self, seller_id: str, kind: CrowdKind) -> bytes:
        """The hash field of a crowd, memoised (the page path asks for the same few often)."""
        key = (seller_id, kind)
        f = self._fields.get(key)
        if f is None:
            if len(self._fields) >= FIELD_CACHE_SIZE:
                self._fields.clear()
            f = self._fields[key] = self.layout.crowd_field(Crowd(seller_id, kind)).encode()
        return f

    async def records(
        self, user_id: str, crowds: Sequence[Crowd], *, redis: aioredis.Redis | None = None
    ) -> dict[Crowd, Record | None]:
        """The stored record of each crowd (``None`` when absent or undecodable)."""
        values = await self.raw_records(user_id, crowds, redis=redis)
        out: dict[Crowd, Record | None] = {}
        for crowd, raw in zip(crowds, values, strict=True):
            if raw is None:
                out[crowd] = None
                continue
            try:
                out[crowd] = self.layout.decode(raw)
            except LayoutError:
                self._anomaly("corrupt_value")
                out[crowd] = None
        return out

    async def member_crowds(
        self,
        user_id: str,
        crowds: Sequence[Crowd],
        *,
        now_ms: int | None = None,
        redis: aioredis.Redis | None = None,
        timeout_s: float | None = None,
    ) -> frozenset[Crowd]:
        """Which of ``crowds`` the buyer is a member of now: one ``HMGET``, one round trip.

        old_fans and purchased_fans also require a live all_fans record of the same seller
        (both kinds mean "follows the seller and ..."), so an unfollow's all_fans tombstone
        ends every crowd of that seller even if the other tombstones were outrun.
        A missing key, a tombstone, an expired record, a corrupt value or a key of the wrong
        type all read as "not a member", never as an exception (counted as anomalies
        ``no_record``, ``corrupt_value``, ``wrong_type``). Redis being unreachable is *not*
        swallowed: ``redis.exceptions.ConnectionError``/``TimeoutError`` reach the caller, which
        alone knows whether to degrade (search) or refuse (checkout); so does ``TimeoutError``
        past ``timeout_s``.
        """
        keys = await self.member_keys(
            user_id,
            [(c.seller_id, c.kind) for c in crowds],
            now_ms=now_ms,
            redis=redis,
            timeout_s=timeout_s,
        )
        return frozenset([c for c in crowds if (c.seller_id, c.kind) in keys])

    def lookup_fields(
        self, crowds: Sequence[tuple[str, CrowdKind]]
    ) -> tuple[list[tuple[tuple[str, CrowdKind], bytes, bytes]], list[bytes]]:
        """What :meth:`member_keys` reads: each crowd with its field and its seller's all_fans
        field, and the distinct fields of the one ``HMGET``."""
        # Hot path (every page): fields are memoised bytes and deduplicated as such.
        field_of = self._field
        all_fans = CrowdKind.ALL_FANS
        asked: list[tuple[tuple[str, CrowdKind], bytes, bytes]] = []
        wanted: dict[bytes, None] = {}
        for key in crowds:
            seller = key[0]
            f = field_of(seller, key[1])
            base = field_of(seller, all_fans)
            asked.append((key, f, base))
            wanted[f] = None
            wanted[base] = None
        return asked, list(wanted)

    async def member_keys(
        self,
        user_id: str,
        crowds: Sequence[tuple[str, CrowdKind]],
        *,
        now_ms: int | None = None,
        redis: aioredis.Redis | None = None,
        timeout_s: float | None = None,
    ) -> frozenset[tuple[str, CrowdKind]]:
        """:meth:`member_crowds` with crowds as ``(seller_id, kind)`` tuples, the form the
        page path builds and tests (hashed in C; no :class:`Crowd` per crowd)."""
        if not crowds:
            return frozenset()
        now = self.clock.now_ms() if now_ms is None else now_ms
        asked, fields = self.lookup_fields(crowds)
        values = await self._hmget(user_id, fields, redis, timeout_s)
        live: set[bytes] = set()
        expiries = self._expiries
        for f, raw in zip(fields, values, strict=True):
            if raw is None:
                continue
            expires = expiries.get(raw)
            if expires is None:
                try:
                    rec = self.layout.decode(raw)
                except LayoutError:
                    self._anomaly("corrupt_value")
                    continue
                if len(expiries) >= VALUE_CACHE_SIZE:
                    expiries.clear()
                expires = expiries[raw] = _NOT_MEMBER if rec.tombstone else rec.expires_ms
            if expires > now:  # Record.is_member
                live.add(f)
        return frozenset([key for key, f, base in asked if f in live and base in live])

    async def all_records(self, user_id: str) -> dict[Crowd, Record]:
        """Every decodable record of a buyer (diagnostics and tests; not on the hot path)."""
        raw = await self.redis.hgetall(self.layout.user_key(user_id))
        out: dict[Crowd, Record] = {}
        for f, v in raw.items():
            try:
                out[self.layout.field_crowd(f)] = self.layout.decode(v)
            except LayoutError:
                self._anomaly("corrupt_value")
        return out
