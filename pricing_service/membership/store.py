"""Membership store: atomic, order-independent writes and one-round-trip page lookups in Redis.

The page path (:meth:`MembershipStore.member_keys`): every crowd of the page's rules - built-in,
seller-defined predicate or list - is answered from ONE ``HMGET`` of the buyer's hash: the fact
field of each seller on the page, the list field of each list crowd and (until the migration
marker is set) the seller's legacy fields. Predicates are decided from the decoded facts at the
time of the read (:mod:`pricing_service.crowds`).
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing_service.crowds import (
    NO_FACTS,
    CrowdDef,
    Hot,
    Predicate,
    builtin_predicates,
    holds_hot,
    hot,
    list_explain,
)
from pricing_service.domain import DAY_MS, Clock, Crowd, CrowdKey, CrowdKind
from pricing_service.membership.derive import MembershipWrite, encode_write
from pricing_service.membership.layout import (
    APPLY_LUA,
    LAYOUT_VERSION,
    REGISTER_LISTS_LUA,
    UNREGISTER_LISTS_LUA,
    Facts,
    LayoutError,
    ListEntry,
    MembershipLayout,
    Record,
    legacy_facts,
    merge_facts,
)
from pricing_service.redis_client import is_cluster
from pricing_service.redis_errors import TRANSIENT_ERRORS
from pricing_service.redis_pipe import PipelinedReader

#: Encoded write arguments memoised by the standalone write path (cleared when full): fields
#: and a list file's one value repeat; fact values are unique per relation and are not memoised.
RESP_CACHE_SIZE = 16_384
#: Seller fields memoised by the page path (cleared when full).
FIELD_CACHE_SIZE = 65_536
#: Decoded fact values memoised by the page path (cleared when full): a buyer's pages repeat
#: their sellers' values until the next write.
VALUE_CACHE_SIZE = 16_384
#: Lookup plans memoised by the page path, by the page's crowds (cleared when full, and when
#: the crowd definitions or the legacy reads change): pages repeat their crowds.
PLAN_CACHE_SIZE = 4_096

#: What a crowd of a page is answered from (:meth:`MembershipStore.lookup_fields`).
_FACTS: Final = 0
_LIST: Final = 1
_UNKNOWN: Final = 2

#: Crowd definitions by (seller_id, crowd_id): the in-process crowd index, or (strict path)
#: what the rule store read.
CrowdResolver = Mapping[CrowdKey, CrowdDef]
_NO_CROWDS: Final[dict[CrowdKey, CrowdDef]] = {}


class AnomalySink(Protocol):
    """Receives counts of reads that found something unexpected (metric hook)."""

    def membership_anomaly(self, reason: str) -> None: ...


@dataclass(slots=True)
class ApplyResult:
    """What a batch of writes did."""

    applied: int = 0
    stale: int = 0
    failed_users: dict[str, str] = field(default_factory=dict)
    #: (buyer, seller) relations whose legacy records were converted to facts
    converted: int = 0

    def add(self, other: ApplyResult) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.failed_users.update(other.failed_users)
        self.converted += other.converted


def group_writes(writes: Iterable[MembershipWrite], by_user: dict[str, list[str | bytes]]) -> int:
    """Append the Lua ARGV pairs (field, value) of ``writes`` to ``by_user`` (by buyer, in order).

    Returns the number of writes dropped because they cannot be represented (a fact dated
    outside the layout's time range: older than its epoch, long expired under any TTL); they
    are counted as stale.
    """
    dropped = 0
    for w in writes:
        try:
            f, v = encode_write(w)
        except LayoutError:
            dropped += 1
            continue
        args = by_user.get(w.user_id)
        if args is None:
            by_user[w.user_id] = [f, v]
        else:
            args.append(f)
            args.append(v)
    return dropped


@dataclass(frozen=True, slots=True)
class _Seller:
    """A seller's fields, memoised: the fact field and the three legacy fields."""

    facts: bytes
    legacy: tuple[bytes, bytes, bytes]


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
        old_fan_min_days: int = 30,
        crowds: CrowdResolver | None = None,
        legacy_reads: bool = True,
    ) -> None:
        self.redis = redis
        #: the hot path's lean pipelined reader (standalone Redis); None = redis-py for reads
        self.reader = reader
        self.layout = layout
        self.clock = clock
        self._sink = anomalies
        self.anomaly_counts: collections.Counter[str] = collections.Counter()
        self.old_fan_min_ms = old_fan_min_days * DAY_MS
        self.builtins: dict[CrowdKind | str, Predicate] = {
            k: p for k, p in builtin_predicates(old_fan_min_days).items()
        }
        #: seller-defined crowds of the page path (the server's in-process crowd index)
        self.crowds: CrowdResolver = crowds if crowds is not None else _NO_CROWDS
        #: also read (and convert) the fields of the layout before issue 14; turned off once
        #: the migration marker is seen (:meth:`check_layout_marker`)
        self.legacy_reads = legacy_reads
        self._sha: str | None = None
        self._sellers: dict[str, _Seller] = {}
        self._lists: dict[int, bytes] = {}
        self._hot: dict[bytes, Hot] = {}
        self._on_list: dict[bytes, int] = {}  # list value -> member until (0: not a member)
        self._plans: dict[tuple[CrowdKey, ...], tuple[_Plan, list[bytes]]] = {}
        self._resp: dict[str, bytes] = {}

    # --- writes --------------------------------------------------------------------------
    async def load_script(self) -> str:
        """Load the write script (on every primary of a cluster); return its sha."""
        sha = await self.redis.script_load(APPLY_LUA)
        self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        return self._sha

    async def apply(self, writes: Iterable[MembershipWrite]) -> ApplyResult:
        """Apply writes (any buyers, any order) in one pipeline: one Lua call per buyer.

        Idempotent and commutative: replaying a batch, or applying batches out of order, ends
        in the same state. Buyers whose key cannot be written (wrong type) are reported in
        ``failed_users`` and the rest still apply.
        """
        by_user: dict[str, list[str | bytes]] = {}
        dropped = group_writes(writes, by_user)
        return await self.apply_args(by_user, stale=dropped)

    async def apply_args(
        self, by_user: Mapping[str, Sequence[str | bytes]], *, stale: int = 0
    ) -> ApplyResult:
        """:meth:`apply` of writes already grouped and encoded by buyer (:func:`group_writes`,
        :class:`~pricing_service.membership.derive.SnapshotEncoder`): ``by_user[user]`` is the
        Lua ARGV pairs (field, value) of the buyer's writes, in order. ``stale`` (writes
        dropped while encoding) is added to the result's count.
        """
        result = ApplyResult(stale=stale)
        if not by_user:
            return result
        if self._sha is None:
            await self.load_script()
        users = list(by_user)
        send = self._send_pipeline if is_cluster(self.redis) else self._send_packed
        lead = (str(self.old_fan_min_ms),)
        for attempt in range(2):
            replies = await send(users, by_user, self._sha or "", lead)
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
        applied = stale_n = converted = 0
        for user, reply in zip(users, replies, strict=True):
            if isinstance(reply, Exception):
                result.failed_users[user] = str(reply)
                continue
            applied += int(reply[0])
            stale_n += int(reply[1])
            converted += int(reply[2])
        result.applied += applied
        result.stale += stale_n
        result.converted += converted
        return result

    async def _send_pipeline(
        self,
        users: list[str],
        by_user: Mapping[str, Sequence[str | bytes]],
        sha: str,
        lead: tuple[str, ...],
    ) -> list[Any]:
        """One EVALSHA per buyer through a redis-py pipeline (Redis Cluster: split by node);
        ARGV = now, ``lead``, the buyer's arguments."""
        now_off = str(self.clock.now_ms())
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
        by_user: Mapping[str, Sequence[str | bytes]],
        sha: str,
        lead: tuple[str, ...],
    ) -> list[Any]:
        """Standalone Redis: the same EVALSHAs as :meth:`_send_pipeline`, packed here.

        redis-py's generic packing costs about 2 us per write; this encodes each distinct
        field (and list value) once (:meth:`_bulk`), sends the batch in one write on one pooled connection
        and reads the replies in order (an error reply is that buyer's result). A connection
        error or timeout is retried once on a fresh connection (as the client's own retry
        policy does: the writes are idempotent), then raised.
        """
        now_raw = str(self.clock.now_ms()).encode()
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
                if type(a) is bytes:  # a fact value: unique, not memoised
                    add(b"$%d\r\n%b\r\n" % (len(a), a))
                else:
                    add(resp.get(a) or bulk(a))  # type: ignore[arg-type]
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

    # --- the list crowd registry (for the list file loader) ----------------------------------
    async def register_lists(self, crowds: Sequence[CrowdDef]) -> None:
        """Publish the list handles of list crowds (idempotent; see REGISTER_LISTS_LUA)."""
        args = [
            a
            for c in crowds
            if c.is_list
            for a in (self.layout.crowd_list_name(c.seller_id, c.crowd_id), str(c.list_handle))
        ]
        if args:
            await self.redis.eval(REGISTER_LISTS_LUA, 1, self.layout.crowd_lists_key, *args)

    async def unregister_lists(self, crowds: Sequence[CrowdDef]) -> None:
        args = [
            a
            for c in crowds
            if c.is_list
            for a in (self.layout.crowd_list_name(c.seller_id, c.crowd_id), str(c.list_handle))
        ]
        if args:
            await self.redis.eval(UNREGISTER_LISTS_LUA, 1, self.layout.crowd_lists_key, *args)

    async def list_handle(self, seller_id: str, crowd_id: str) -> int | None:
        """The list handle the registry holds for a list crowd (None: no such list crowd)."""
        raw = await self.redis.hget(
            self.layout.crowd_lists_key, self.layout.crowd_list_name(seller_id, crowd_id)
        )
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            self._anomaly("corrupt_value")
            return None

    # --- reads ---------------------------------------------------------------------------
    def _anomaly(self, reason: str) -> None:
        self.anomaly_counts[reason] += 1
        if self._sink is not None:
            self._sink.membership_anomaly(reason)

    async def check_layout_marker(self, redis: aioredis.Redis | None = None) -> bool:
        """Read the migration marker; once it is set, stop reading legacy fields. True when
        the marker is set (legacy reads are off)."""
        if not self.legacy_reads:
            return True
        raw = await (redis or self.redis).get(self.layout.layout_version_key)
        if raw is not None and (raw.decode() if isinstance(raw, bytes) else str(raw)) == (
            LAYOUT_VERSION
        ):
            self.legacy_reads = False
            self._plans.clear()
        return not self.legacy_reads

    def crowds_changed(self) -> None:
        """The crowd definitions changed (the crowd index calls this): forget the plans."""
        self._plans.clear()

    async def _hmget(
        self,
        user_id: str,
        fields: Sequence[str | bytes],
        redis: aioredis.Redis | None,
        timeout_s: float | None = None,
    ) -> list[bytes | None]:
        """One ``HMGET`` of the buyer's hash, with its anomaly accounting; ``TimeoutError``
        past ``timeout_s``.

        A key of the wrong type reads as all ``None`` (anomaly ``wrong_type``); a reply with no
        field at all - nearly always a missing key: a buyer without facts, or lost data - is
        counted as ``no_record``. Every other Redis error (connection refused, timeout, ...)
        propagates: the caller decides whether to degrade or refuse.
        """
        if not fields:
            return []
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

    def _seller(self, seller_id: str) -> _Seller:
        """A seller's fields, memoised (the page path asks for the same few often)."""
        s = self._sellers.get(seller_id)
        if s is None:
            if len(self._sellers) >= FIELD_CACHE_SIZE:
                self._sellers.clear()
            a, o, p = self.layout.legacy_fields(seller_id)
            s = self._sellers[seller_id] = _Seller(
                self.layout.fact_field(seller_id).encode(), (a.encode(), o.encode(), p.encode())
            )
        return s

    def _list_field(self, handle: int) -> bytes:
        f = self._lists.get(handle)
        if f is None:
            if len(self._lists) >= FIELD_CACHE_SIZE:
                self._lists.clear()
            f = self._lists[handle] = self.layout.list_field(handle).encode()
        return f

    def lookup_fields(
        self, crowds: Sequence[CrowdKey], resolve: CrowdResolver | None = None
    ) -> tuple[_Plan, list[bytes]]:
        """What :meth:`member_keys` reads: how each crowd is decided, and the distinct fields
        of the one ``HMGET`` (each seller's fact field - and its legacy fields while those are
        read - and each list crowd's list field). Memoised by the crowds when they are resolved
        through the store's own crowd index (the page path)."""
        if resolve is not None:
            return self._plan(crowds, resolve)
        key = tuple(crowds)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(crowds, self.crowds)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _plan(
        self, crowds: Sequence[CrowdKey], resolve: CrowdResolver
    ) -> tuple[_Plan, list[bytes]]:
        builtins = self.builtins
        legacy = self.legacy_reads
        index: dict[bytes, int] = {}
        slots: dict[str, int] = {}
        slot_fields: list[tuple[int, int, int, int]] = []
        asked: list[tuple[CrowdKey, int, int, Predicate | None]] = []
        for key in crowds:
            seller, ref = key
            pred = builtins.get(ref)
            if pred is None:
                d = resolve.get(key)
                if d is None:  # a crowd this process does not know (yet): nobody is in it
                    asked.append((key, _UNKNOWN, -1, None))
                    continue
                if d.predicate is None:
                    lf = self._list_field(d.list_handle)
                    i = index.get(lf)
                    if i is None:
                        i = index[lf] = len(index)
                    asked.append((key, _LIST, i, None))
                    continue
                pred = d.predicate
            slot = slots.get(seller)
            if slot is None:
                sf = self._seller(seller)
                fi = index.get(sf.facts)
                if fi is None:
                    fi = index[sf.facts] = len(index)
                ai = oi = pi = -1
                if legacy:
                    a, o, p = sf.legacy
                    ai = index[a] = len(index)
                    oi = index[o] = len(index)
                    pi = index[p] = len(index)
                slot = slots[seller] = len(slot_fields)
                slot_fields.append((fi, ai, oi, pi))
            asked.append((key, _FACTS, slot, pred))
        return _Plan(asked, slot_fields), list(index)

    def _hot_of(self, raw: bytes) -> Hot:
        """The decoded fact value, memoised (values are immutable)."""
        h = self._hot.get(raw)
        if h is None:
            try:
                h = hot(self.layout.decode_facts(raw))
            except LayoutError:
                self._anomaly("corrupt_value")
                return NO_FACTS
            if len(self._hot) >= VALUE_CACHE_SIZE:
                self._hot.clear()
            self._hot[raw] = h
        return h

    def _record(self, raw: bytes | None) -> Record | None:
        if raw is None:
            return None
        try:
            return self.layout.decode(raw)
        except LayoutError:
            self._anomaly("corrupt_value")
            return None

    def _facts_of(self, raw: bytes | None) -> Facts | None:
        if raw is None:
            return None
        try:
            return self.layout.decode_facts(raw)
        except LayoutError:
            self._anomaly("corrupt_value")
            return None

    def _merged_facts(
        self, values: Sequence[bytes | None], fields: tuple[int, int, int, int], now: int
    ) -> Facts | None:
        """The facts of one seller slot: the fact field merged with the legacy records."""
        fi, ai, oi, pi = fields
        facts = self._facts_of(values[fi])
        if ai >= 0 and (values[ai] is not None or values[oi] is not None or values[pi] is not None):
            old = legacy_facts(
                self._record(values[ai]),
                self._record(values[oi]),
                self._record(values[pi]),
                self.old_fan_min_ms,
                now,
            )
            return merge_facts(facts, old, now)
        return facts.live(now) if facts is not None else None

    def _list_entry(self, raw: bytes | None) -> ListEntry | None:
        if raw is None:
            return None
        try:
            return self.layout.decode_list(raw)
        except LayoutError:
            self._anomaly("corrupt_value")
            return None

    async def member_keys(
        self,
        user_id: str,
        crowds: Sequence[CrowdKey],
        *,
        now_ms: int | None = None,
        redis: aioredis.Redis | None = None,
        timeout_s: float | None = None,
        resolve: CrowdResolver | None = None,
        reasons: dict[CrowdKey, str] | None = None,
    ) -> frozenset[CrowdKey]:
        """Which of ``crowds`` the buyer is in now: one ``HMGET``, one round trip.

        ``crowds`` are :data:`~pricing_service.domain.CrowdKey` tuples (built-in kind or the
        seller's crowd id, resolved through ``resolve``, default the store's crowd index; a
        crowd it does not know has no members). A missing key, a corrupt value or a key of the
        wrong type all read as "no facts", never as an exception (anomalies ``no_record``,
        ``corrupt_value``, ``wrong_type``). Redis being unreachable is *not* swallowed:
        ``redis.exceptions.ConnectionError``/``TimeoutError`` reach the caller, which alone
        knows whether to degrade (search) or refuse (checkout); so does ``TimeoutError`` past
        ``timeout_s``. With ``reasons``, each crowd's explanation is put there.
        """
        if not crowds:
            return frozenset()
        now = self.clock.now_ms() if now_ms is None else now_ms
        plan, fields = self.lookup_fields(crowds, resolve)
        values = await self._hmget(user_id, fields, redis, timeout_s)
        if reasons is not None:
            return self._explained(plan, values, now, reasons)
        hots: list[Hot] = []
        hot_of = self._hot_of
        for fs in plan.slots:
            if fs[1] >= 0 and (
                values[fs[1]] is not None or values[fs[2]] is not None or values[fs[3]] is not None
            ):
                hots.append(hot(self._merged_facts(values, fs, now)))
                continue
            raw = values[fs[0]]
            hots.append(NO_FACTS if raw is None else hot_of(raw))
        members: list[CrowdKey] = []
        for key, how, i, pred in plan.asked:
            if how == _FACTS:
                if holds_hot(pred.thresholds, hots[i], now):  # type: ignore[union-attr]
                    members.append(key)
            elif how == _LIST:
                raw = values[i]
                if raw is not None:
                    until = self._on_list.get(raw)
                    if until is None:
                        until = self._list_until(raw)
                    if until > now:
                        members.append(key)
        return frozenset(members)

    def _list_until(self, raw: bytes) -> int:
        """Until when a list value makes a member (0: a removal or corrupt), memoised."""
        entry = self._list_entry(raw)
        if entry is None:
            return 0  # corrupt: counted each time, not memoised
        until = 0 if entry.removed else entry.expires_ms
        if len(self._on_list) >= VALUE_CACHE_SIZE:
            self._on_list.clear()
        self._on_list[raw] = until
        return until

    def _explained(
        self,
        plan: _Plan,
        values: Sequence[bytes | None],
        now: int,
        reasons: dict[CrowdKey, str],
    ) -> frozenset[CrowdKey]:
        """:meth:`member_keys` with a reason per crowd (explain: not the hot path)."""
        facts = [self._merged_facts(values, fs, now) for fs in plan.slots]
        members: list[CrowdKey] = []
        for key, how, i, pred in plan.asked:
            if how == _FACTS:
                assert pred is not None
                if pred.holds(facts[i], now):
                    members.append(key)
                reasons[key] = pred.explain(facts[i], now)
            elif how == _LIST:
                entry = self._list_entry(values[i])
                if entry is not None and entry.is_member(now):
                    members.append(key)
                reasons[key] = list_explain(entry, now)
            else:
                reasons[key] = f"sellers/{key[0]}/crowds/{key[1]} is not a crowd this server knows"
        return frozenset(members)

    async def member_crowds(
        self,
        user_id: str,
        crowds: Sequence[Crowd],
        *,
        now_ms: int | None = None,
        redis: aioredis.Redis | None = None,
        timeout_s: float | None = None,
        resolve: CrowdResolver | None = None,
    ) -> frozenset[Crowd]:
        """:meth:`member_keys` with :class:`~pricing_service.domain.Crowd` objects."""
        keys = await self.member_keys(
            user_id,
            [c.key for c in crowds],
            now_ms=now_ms,
            redis=redis,
            timeout_s=timeout_s,
            resolve=resolve,
        )
        return frozenset([c for c in crowds if c.key in keys])

    async def facts(
        self,
        user_id: str,
        seller_ids: Sequence[str],
        *,
        now_ms: int | None = None,
        redis: aioredis.Redis | None = None,
    ) -> dict[str, Facts | None]:
        """The live facts of each (buyer, seller), legacy records included (one ``HMGET``)."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        plan, fields = self.lookup_fields([(s, CrowdKind.ALL_FANS) for s in seller_ids])
        values = await self._hmget(user_id, fields, redis)
        out: dict[str, Facts | None] = {}
        for key, _, slot, _ in plan.asked:
            out[key[0]] = self._merged_facts(values, plan.slots[slot], now)
        return out

    async def all_fields(self, user_id: str) -> dict[tuple[str, str | int | Crowd], Any]:
        """Every decodable field of a buyer, decoded as stored (diagnostics and tests; not on
        the hot path): ``("facts", seller)`` -> :class:`Facts`, ``("list", handle)`` ->
        :class:`ListEntry`, ``("legacy", Crowd)`` -> :class:`Record`."""
        raw = await self.redis.hgetall(self.layout.user_key(user_id))
        out: dict[tuple[str, str | int | Crowd], Any] = {}
        for f, v in raw.items():
            try:
                kind, what = self.layout.parse_field(f)
                if kind == "facts":
                    out[(kind, what)] = self.layout.decode_facts(
                        v if isinstance(v, bytes) else v.encode()
                    )
                elif kind == "list":
                    out[(kind, what)] = self.layout.decode_list(v)
                else:
                    out[(kind, what)] = self.layout.decode(v)
            except LayoutError:
                self._anomaly("corrupt_value")
        return out


@dataclass(frozen=True, slots=True)
class _Plan:
    """How :meth:`MembershipStore.member_keys` answers a page's crowds from its ``HMGET``.

    ``asked``: per crowd (key, how, index, predicate): ``_FACTS`` - the predicate over the facts
    of seller slot ``index``; ``_LIST`` - the list entry at field ``index``; ``_UNKNOWN``.
    ``slots``: per seller, the indexes of its fact field and legacy fields (-1: not read).
    """

    asked: list[tuple[CrowdKey, int, int, Predicate | None]]
    slots: list[tuple[int, int, int, int]]
