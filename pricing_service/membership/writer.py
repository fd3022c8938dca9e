"""The membership writer: atomic, order-independent writes to the buyer hashes, in batches.

The sync worker's write path (events, snapshots, list files, the migration) and the admin
API's list changes: every write is a fact or list entry of :mod:`~pricing_service.membership.derive`,
merged in Redis by the layout's write script (:data:`~pricing_service.membership.lua.APPLY_LUA`),
one call per buyer, a batch in one pipeline. Also the writes of the list crowd registry (the
pricing service publishes list handles there; the list file loader reads them through
:class:`~pricing_service.membership.reader.MembershipReader`).

Commands go out in RESP encoded by :mod:`pricing_service.redis_pipe` (the one encoder).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing_service.crowds import CrowdDef
from pricing_service.domain import DAY_MS, Clock
from pricing_service.membership.derive import MembershipWrite, encode_write
from pricing_service.membership.layout import LayoutError, MembershipLayout
from pricing_service.membership.lua import APPLY_LUA, REGISTER_LISTS_LUA, UNREGISTER_LISTS_LUA
from pricing_service.redis_client import is_cluster
from pricing_service.redis_errors import TRANSIENT_ERRORS
from pricing_service.redis_pipe import encode_array, encode_bulk

#: Encoded write arguments memoised by the standalone write path (cleared when full): fields
#: and a list file's one value repeat; fact values are unique per relation and are not memoised.
RESP_CACHE_SIZE = 16_384


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


class MembershipWriter:
    """The only writer of membership keys (layout in :mod:`.layout`)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        layout: MembershipLayout,
        clock: Clock,
        *,
        old_fan_min_days: int = 30,
    ) -> None:
        self.redis = redis
        self.layout = layout
        self.clock = clock
        self.old_fan_min_ms = old_fan_min_days * DAY_MS
        self._sha: str | None = None
        self._resp: dict[str, bytes] = {}

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
            b = encode_bulk(arg)
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
        head = encode_bulk("EVALSHA") + encode_bulk(sha) + encode_bulk("1")
        now_b = encode_bulk(str(self.clock.now_ms())) + b"".join(map(self._bulk, lead))
        fixed = 5 + len(lead)  # EVALSHA sha numkeys key now + lead
        user_key = self.layout.user_key
        bulk = self._bulk
        resp = self._resp
        heads: dict[int, bytes] = {}  # by the buyer's argument count: *N EVALSHA sha 1
        chunks: list[bytes] = []
        add = chunks.append
        for user in users:
            args = by_user[user]
            h = heads.get(len(args))
            if h is None:
                h = heads[len(args)] = encode_array(len(args) + fixed) + head
            add(h)
            add(encode_bulk(user_key(user)))
            add(now_b)
            for a in args:
                if type(a) is bytes:  # a fact value: unique, not memoised
                    add(encode_bulk(a))
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

    # --- the list crowd registry (for the list file loader; read by the reader) -------------
    async def register_lists(self, crowds: Sequence[CrowdDef]) -> None:
        """Publish the list handles of list crowds (idempotent; see REGISTER_LISTS_LUA)."""
        await self._registry(REGISTER_LISTS_LUA, crowds)

    async def unregister_lists(self, crowds: Sequence[CrowdDef]) -> None:
        """Withdraw the list handles of deleted list crowds (see UNREGISTER_LISTS_LUA)."""
        await self._registry(UNREGISTER_LISTS_LUA, crowds)

    async def _registry(self, script: str, crowds: Sequence[CrowdDef]) -> None:
        args = [
            a
            for c in crowds
            if c.is_list
            for a in (self.layout.crowd_list_name(c.seller_id, c.crowd_id), str(c.list_handle))
        ]
        if args:
            await self.redis.eval(script, 1, self.layout.crowd_lists_key, *args)
