"""The load's driver: :class:`Load` sets the system up, runs the callers, the event producer
and the admin writer, and records every call and every broken promise (the package's docstring
lists them); what it checks after the load is :class:`~pricing_testing.load.checks.LoadChecks`'s."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.config import load_settings
from pricing_service.domain import SystemClock
from pricing_service.membership import derive
from pricing_service.membership.derive import MembershipWrite
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.redis_client import is_cluster_url, make_redis
from pricing_service.replica_acks import ReplicaAcks
from pricing_testing.load.checks import LoadChecks
from pricing_testing.load.model import (
    ADMIN_TOKEN,
    FAN_PRICE,
    ITEM,
    LIST_PRICE,
    PUBLISH_ERRORS,
    SELLER,
    STREAM_SELLERS,
    AckedRule,
    Call,
    LoadConfig,
    MembershipModel,
    Population,
    Violation,
    code_name,
    money,
    now_ms,
    reason_of,
)
from sync_worker.events import EVENT_FIELD, make_event
from sync_worker.partitions import partition_of, partition_streams

#: a call's request metadata
Metadata = tuple[tuple[str, str], ...]


class Load(LoadChecks):
    """Drives the system; ``start()``, let the fault happen, ``await stop()``, then check."""

    def __init__(
        self,
        *,
        target: str | Sequence[str],
        redis_url: str,
        namespace: str,
        events_stream: str,
        consumer_group: str,
        dead_letter_stream: str,
        population: Population,
        config: LoadConfig | None = None,
        admin_token: str = ADMIN_TOKEN,
        seed: int = 7,
        partitions: int = 1,
        producer_wait_replicas: int = 0,
    ) -> None:
        targets = [target] if isinstance(target, str) else list(target)
        # several channels with their own connections (spread over processes sharing a port)
        self.channels = [
            grpc.aio.insecure_channel(t, options=[("grpc.use_local_subchannel_pool", 1)])
            for t in targets
        ]
        self.redis_url = redis_url
        self.redis: aioredis.Redis
        if is_cluster_url(redis_url):
            self.redis = make_redis(
                load_settings(
                    redis_url=redis_url, redis_socket_timeout_ms=1000, redis_connect_timeout_ms=500
                )
            )
        else:
            self.redis = aioredis.Redis.from_url(
                redis_url, socket_timeout=1.0, socket_connect_timeout=0.5
            )
        self.layout = MembershipLayout(namespace)
        self.stream = events_stream
        self.partitions = partitions
        self.streams = partition_streams(events_stream, partitions)
        self.producer_acks = (
            ReplicaAcks(
                self.redis, f"{namespace}test:producer-ack:", replicas=producer_wait_replicas
            )
            if producer_wait_replicas > 0
            else None
        )
        self.group = consumer_group
        self.dead_stream = dead_letter_stream
        self.pop = population
        self.cfg = config or LoadConfig()
        self.admin_md = (("authorization", f"Bearer {admin_token}"),)
        self.rng = random.Random(seed)
        self.model = MembershipModel()
        self.calls: list[Call] = []
        #: each call's x-request-id is "<tag>-<n>"
        self._call_tag = f"load{seed}x{random.getrandbits(24):06x}"
        self._call_n = 0
        self.violations: list[Violation] = []
        self.acked_rules: list[AckedRule] = []
        self.admin_failures: Counter[str] = Counter()
        self.unfollow_attempt_ms: dict[str, float] = {}
        self.unfollow_ack_ms: dict[str, float] = {}
        self.events_acked = 0
        self.poison_published = 0
        self.publish_errors = 0
        self.last_ack_ms = 0.0
        self.stopped_ms = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unfollows: asyncio.Task[None] | None = None
        self._stream_state: dict[tuple[str, str], bool] = {}
        self._user_clock: dict[str, int] = {}
        self._admin_n = 0
        self._fans = set(population.fans)
        # streamers only ever follow STREAM_SELLERS, never SELLER
        self._strangers = set(population.strangers) | set(population.streamers)

    # --- set-up ---------------------------------------------------------------------------
    async def seed_state(self, *, cut_ms: int | None = None, rule: bool = True) -> None:
        """Snapshot rows for fans and churn (written directly), a rule for them, one poison
        entry on the stream; waits until the server's index has the rule."""
        cut = cut_ms if cut_ms is not None else now_ms() - 3_600_000
        writes: list[MembershipWrite] = []
        for i, user in enumerate(self.pop.fans + self.pop.churn):
            followed = cut - (60 if i % 2 else 2) * derive.DAY_MS
            rows = derive.snapshot_row(user, SELLER, followed, i % 3, cut, self.model.ttls)
            writes += rows
            self.model.apply(rows)
        for user in self.pop.streamers + self.pop.strangers:
            self.model.users.add(user)
        store = MembershipStore(self.redis, self.layout, SystemClock())
        result = await store.apply(writes)
        assert not result.failed_users, result.failed_users
        await self.redis.xadd(self.streams[0], {b"garbage": b"not an event"})
        self.poison_published += 1
        if rule:
            await self.upsert_rule(SELLER, ITEM, FAN_PRICE)

    async def upsert_rule(self, seller: str, item: str, amount: int) -> admin_pb2.DiscountRule:
        admin = admin_pb2_grpc.DiscountAdminServiceStub(self.channels[0])
        resp = await admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(
                rule=admin_pb2.DiscountRule(
                    seller_id=seller,
                    item_id=item,
                    crowd=common_pb2.CROWD_KIND_ALL_FANS,
                    price=money(amount),
                )
            ),
            metadata=self.admin_md,
            timeout=5,
        )
        self.acked_rules.append(AckedRule(resp.rule.rule_id, item, amount, int(resp.rule.revision)))
        await self.wait_rule_visible(item, amount)
        return resp.rule

    async def wait_rule_visible(self, item: str, amount: int, timeout_s: float = 10) -> None:
        """Until every channel's server discounts ``item`` to ``amount`` for a fan."""
        fan = self.pop.fans[0]
        for channel in self.channels:
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            deadline = time.monotonic() + timeout_s
            while True:
                r = await stub.BatchGetLowestPrice(
                    pricing_pb2.BatchGetLowestPriceRequest(
                        user_id=fan,
                        items=[pricing_pb2.PriceQuery(item_id=item, list_price=money(LIST_PRICE))],
                    ),
                    timeout=5,
                )
                p = r.prices[0]
                if p.discounted and p.price.amount_minor == amount:
                    break
                assert time.monotonic() < deadline, f"rule for {item} never visible: {r}"
                await asyncio.sleep(0.05)

    async def wait_strict_ready(self, timeout_s: float = 15) -> None:
        """Until CheckDiscountStrict answers (the worker published a fresh watermark)."""
        stub = pricing_pb2_grpc.PricingServiceStub(self.channels[0])
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await stub.CheckDiscountStrict(
                    pricing_pb2.CheckDiscountStrictRequest(user_id=self.pop.fans[0], item_id=ITEM),
                    timeout=2,
                )
                return
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                assert time.monotonic() < deadline, f"strict never ready: {err.details()}"
                await asyncio.sleep(0.05)

    # --- running --------------------------------------------------------------------------
    def start(
        self,
        *,
        batch: bool = True,
        strict: bool = True,
        events: bool = True,
        admin: bool = True,
        unfollows: bool = True,
    ) -> None:
        self._stop.clear()
        spawn = self._tasks.append
        n = 0
        if batch:
            for _ in range(self.cfg.batch_concurrency):
                spawn(asyncio.create_task(self._batch_loop(self.channels[n % len(self.channels)])))
                n += 1
        if strict:
            for _ in range(self.cfg.strict_concurrency):
                spawn(asyncio.create_task(self._strict_loop(self.channels[n % len(self.channels)])))
                n += 1
        if events:
            spawn(asyncio.create_task(self._event_loop()))
        if admin:
            spawn(asyncio.create_task(self._admin_loop()))
        if unfollows and self.pop.churn:
            self._unfollows = asyncio.create_task(self._unfollow_all())

    async def stop(self, *, timeout_s: float = 30) -> None:
        """Stop the loops; unfollows and unacknowledged event batches are finished first."""
        if self._unfollows is not None:
            await asyncio.wait_for(self._unfollows, timeout_s)
        self.stopped_ms = time.time() * 1000
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
        for t in pending:
            t.cancel()
        assert not pending, f"{len(pending)} load loops did not stop within {timeout_s}s"
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
        self._tasks = []

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        await self.redis.aclose()

    def _violation(self, what: str, detail: str) -> None:
        self.violations.append(Violation(what, detail, now_ms()))

    async def _timed(
        self, method: str, user: str, call: Callable[[Metadata], Awaitable[Any]]
    ) -> tuple[Call, Any]:
        """``call`` with the call's own ``x-request-id`` (to find it in a server's log)."""
        self._call_n += 1
        request_id = f"{self._call_tag}-{self._call_n}"
        start = time.time() * 1000
        reason = ""
        try:
            reply = await call((("x-request-id", request_id),))
            code = "OK"
        except grpc.aio.AioRpcError as err:
            reply, code, reason = err, code_name(err), reason_of(err)
        rec = Call(
            method, user, start, time.time() * 1000, code, request_id=request_id, reason=reason
        )
        self.calls.append(rec)
        return rec, reply

    async def _pause(self) -> None:
        if self.cfg.call_pause_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.call_pause_s)
        else:
            await asyncio.sleep(0)

    async def _batch_loop(self, channel: grpc.aio.Channel) -> None:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        items = [pricing_pb2.PriceQuery(item_id=ITEM, list_price=money(LIST_PRICE))] + [
            pricing_pb2.PriceQuery(item_id=f"filler{i}", list_price=money(100 + i))
            for i in range(self.cfg.batch_items - 1)
        ]
        users = self.pop.fans + self.pop.strangers + self.pop.churn + self.pop.streamers
        while not self._stop.is_set():
            user = self.rng.choice(users)
            req = pricing_pb2.BatchGetLowestPriceRequest(user_id=user, items=items)
            rec, reply = await self._timed(
                "BatchGetLowestPrice",
                user,
                lambda md, req=req: stub.BatchGetLowestPrice(  # type: ignore[misc]
                    req, metadata=md, timeout=self.cfg.batch_deadline_s
                ),
            )
            if rec.code != "OK":
                detail = reply.details() if isinstance(reply, grpc.aio.AioRpcError) else ""
                self._violation(
                    "batch_failed",
                    f"{user}: {rec.code} after {rec.latency_ms:.0f} ms at {rec.start_ms:.0f}: {detail}",
                )
            else:
                rec.degraded = bool(reply.degraded)
                self._check_batch(user, reply)
            await self._pause()

    def _check_batch(self, user: str, reply: pricing_pb2.BatchGetLowestPriceResponse) -> None:
        p = reply.prices[0]
        if len(reply.prices) != self.cfg.batch_items or p.item_id != ITEM:
            self._violation("batch_wrong_shape", f"{user}: {len(reply.prices)} prices")
            return
        if any(
            q.discounted or q.price.amount_minor != 100 + i for i, q in enumerate(reply.prices[1:])
        ):
            self._violation("batch_filler_wrong", f"{user}: {reply.prices[1:]}")
        if p.discounted and p.price.amount_minor != FAN_PRICE:
            self._violation("batch_wrong_price", f"{user}: {p.price.amount_minor}")
        if not p.discounted and p.price.amount_minor != LIST_PRICE:
            self._violation("batch_wrong_list_price", f"{user}: {p.price.amount_minor}")
        if user in self._strangers and p.discounted:
            self._violation("batch_stranger_discounted", user)
        if user in self._fans and not p.discounted and not reply.degraded:
            self._violation("batch_fan_not_discounted", f"{user} (not degraded)")
        if reply.degraded and p.discounted:
            self._violation("batch_degraded_discounted", user)

    async def _strict_loop(self, channel: grpc.aio.Channel) -> None:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        users = self.pop.fans + self.pop.churn
        i = 0
        while not self._stop.is_set():
            user = users[i % len(users)]
            i += 1
            req = pricing_pb2.CheckDiscountStrictRequest(user_id=user, item_id=ITEM)
            rec, reply = await self._timed(
                "CheckDiscountStrict",
                user,
                lambda md, req=req: stub.CheckDiscountStrict(  # type: ignore[misc]
                    req, metadata=md, timeout=self.cfg.strict_deadline_s
                ),
            )
            if rec.code == "OK":
                rec.verdict = int(reply.verdict)
                self._check_strict(rec)
            elif rec.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                detail = reply.details() if isinstance(reply, grpc.aio.AioRpcError) else ""
                self._violation("strict_bad_refusal", f"{user}: {rec.code} {detail}")
            await self._pause()

    def _check_strict(self, rec: Call) -> None:
        user = rec.user
        if rec.verdict == pricing_pb2.VERDICT_ELIGIBLE:
            acked = self.unfollow_ack_ms.get(user)
            if acked is not None and acked + self.cfg.strict_max_lag_ms < rec.start_ms:
                self._violation(
                    "strict_wrongly_eligible",
                    f"{user}: unfollow acknowledged {rec.start_ms - acked:.0f} ms before the call",
                )
        elif rec.verdict == pricing_pb2.VERDICT_NOT_IN_CROWD:
            attempted = self.unfollow_attempt_ms.get(user)
            if attempted is None or attempted > rec.end_ms:
                self._violation("strict_fan_not_in_crowd", f"{user}: no unfollow was published")
        else:
            self._violation("strict_wrong_verdict", f"{user}: verdict {rec.verdict}")

    # --- events ------------------------------------------------------------------------------
    def _fact_time(self, user: str) -> int:
        """Now, strictly after the buyer's previous fact (no ties in the model)."""
        t = max(now_ms(), self._user_clock.get(user, 0) + 1)
        self._user_clock[user] = t
        return t

    def stream_of(self, user: str) -> str:
        return self.streams[partition_of(user, self.partitions)]

    async def _publish(self, events: list[tuple[str, str, str, int]], *, give_up_s: float) -> float:
        """XADD until acknowledged (a retry after a lost reply is a harmless duplicate); with
        ``producer_wait_replicas``, acknowledged means a replica has the entries too."""
        entries = [
            {EVENT_FIELD: make_event(k, u, s, at).SerializeToString()} for k, u, s, at in events
        ]
        deadline = time.monotonic() + give_up_s
        while True:
            try:
                pipe = self.redis.pipeline(transaction=False)
                for (_, user, _, _), e in zip(events, entries, strict=True):
                    pipe.xadd(self.stream_of(user), e)  # type: ignore[arg-type]
                await pipe.execute()
                if self.producer_acks is not None:
                    waited = await self.producer_acks.wait(
                        {self.stream_of(u) for _, u, _, _ in events}
                    )
                    if not waited.ok:
                        raise RedisError(f"WAIT short on {waited.short}")
                break
            except PUBLISH_ERRORS as exc:
                self.publish_errors += 1
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not publish for {give_up_s}s: {exc!r}") from exc
                await asyncio.sleep(0.05)
        acked = time.time() * 1000
        for k, u, s, at in events:
            self.model.event(k, u, s, at)
        self.events_acked += len(events)
        self.last_ack_ms = max(self.last_ack_ms, acked)
        return acked

    async def _event_loop(self) -> None:
        fans = self.pop.fans
        streamers = self.pop.streamers
        while not self._stop.is_set():
            batch: list[tuple[str, str, str, int]] = []
            for _ in range(self.cfg.events_per_tick):
                if fans and self.rng.random() < 0.15:
                    user = self.rng.choice(fans)
                    batch.append(("purchase", user, SELLER, self._fact_time(user)))
                    continue
                user = self.rng.choice(streamers)
                seller = self.rng.choice(STREAM_SELLERS)
                following = self._stream_state.get((user, seller), False)
                self._stream_state[(user, seller)] = not following
                kind = "unfollow" if following else "follow"
                batch.append((kind, user, seller, self._fact_time(user)))
            await self._publish(batch, give_up_s=30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.event_interval_s)

    async def _unfollow_all(self) -> None:
        churn = self.pop.churn
        gap = self.cfg.unfollow_spread_s / max(len(churn), 1)
        for user in churn:
            self.unfollow_attempt_ms[user] = time.time() * 1000
            self.unfollow_ack_ms[user] = await self._publish(
                [("unfollow", user, SELLER, self._fact_time(user))], give_up_s=30
            )
            await asyncio.sleep(gap)

    # --- admin -------------------------------------------------------------------------------
    async def _admin_loop(self) -> None:
        admin = admin_pb2_grpc.DiscountAdminServiceStub(self.channels[0])
        while not self._stop.is_set():
            self._admin_n += 1
            n = self._admin_n
            item = f"adm{n}"
            amount = 1000 + n
            req = admin_pb2.UpsertDiscountRuleRequest(
                rule=admin_pb2.DiscountRule(
                    seller_id=SELLER,
                    item_id=item,
                    crowd=common_pb2.CROWD_KIND_ALL_FANS,
                    price=money(amount),
                )
            )
            rec, reply = await self._timed(
                "UpsertDiscountRule",
                "",
                lambda md, req=req: admin.UpsertDiscountRule(  # type: ignore[misc]
                    req, metadata=self.admin_md + md, timeout=self.cfg.admin_deadline_s
                ),
            )
            if rec.code == "OK":
                self.acked_rules.append(
                    AckedRule(reply.rule.rule_id, item, amount, int(reply.rule.revision))
                )
            else:
                self.admin_failures[rec.code] += 1
                if rec.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    self._violation("admin_bad_error", f"{item}: {rec.code} {reply.details()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.admin_interval_s)
