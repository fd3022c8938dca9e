"""What the load checks after it stopped: the system settled, Redis against the model, the
stream's pending list and dead letters, every acknowledged rule write in the rule store, the
strict answers; and the summary of the calls. A base of :class:`~pricing_testing.load.Load`."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import grpc
import redis.asyncio as aioredis

from pricing.v1 import admin_pb2, admin_pb2_grpc, pricing_pb2, pricing_pb2_grpc
from pricing_service.membership.layout import Facts, MembershipLayout
from pricing_testing.load.model import (
    ITEM,
    SELLER,
    AckedRule,
    Call,
    MembershipModel,
    Population,
    Violation,
)


class LoadChecks:
    """The after-the-load half of :class:`~pricing_testing.load.Load` (whose ``__init__`` sets
    these attributes)."""

    channels: list[grpc.aio.Channel]
    redis: aioredis.Redis
    layout: MembershipLayout
    streams: list[str]
    group: str
    dead_stream: str
    pop: Population
    admin_md: tuple[tuple[str, str], ...]
    model: MembershipModel
    calls: list[Call]
    violations: list[Violation]
    acked_rules: list[AckedRule]
    admin_failures: Counter[str]
    unfollow_ack_ms: dict[str, float]
    events_acked: int
    poison_published: int
    publish_errors: int
    last_ack_ms: float

    async def settle(self, timeout_s: float = 30) -> dict[str, int]:
        """Until the worker's watermark passed the last acknowledged event and nothing is
        pending; returns the stream's state."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = await self.stream_state()
            if state["watermark_ms"] > self.last_ack_ms and state["pending"] == 0:
                return state
            assert time.monotonic() < deadline, f"the system never settled: {state}"
            await asyncio.sleep(0.1)

    async def stream_state(self) -> dict[str, int]:
        raw = await self.redis.get(self.layout.watermark_key)
        pending = length = 0
        for stream in self.streams:
            pending += int((await self.redis.xpending(stream, self.group))["pending"])
            length += int(await self.redis.xlen(stream))
        return {
            "watermark_ms": int(raw) if raw is not None else 0,
            "pending": pending,
            "length": length,
            "dead_letters": int(await self.redis.xlen(self.dead_stream)),
        }

    async def membership_mismatches(self, users: Iterable[str] | None = None) -> list[str]:
        """Every buyer whose records differ from the model (state, version, expiry)."""
        names = sorted(users if users is not None else self.model.users)
        out = []
        for i in range(0, len(names), 500):
            chunk = names[i : i + 500]
            pipe = self.redis.pipeline(transaction=False)
            for user in chunk:
                pipe.hgetall(self.layout.user_key(user))
            for user, raw in zip(chunk, await pipe.execute(), strict=True):
                got: dict[str, Facts] = {}
                for f, v in raw.items():
                    kind, seller = self.layout.parse_field(f)
                    assert kind == "facts", (user, f)
                    got[str(seller)] = self.layout.decode_facts(v)
                want = self.model.expected(user)
                if got != want:
                    diff = {
                        s: (want.get(s), got.get(s))
                        for s in set(got) | set(want)
                        if got.get(s) != want.get(s)
                    }
                    out.append(f"{user}: (model, redis) {diff}")
        return out

    async def rule_mismatches(self) -> list[str]:
        """Every acknowledged rule write that the store does not hold as acknowledged."""
        admin = admin_pb2_grpc.DiscountAdminServiceStub(self.channels[0])
        out = []
        listed: dict[str, admin_pb2.DiscountRule] = {}
        token = ""
        while True:
            page = await admin.ListDiscountRules(
                admin_pb2.ListDiscountRulesRequest(
                    seller_id=SELLER, page_size=500, page_token=token
                ),
                metadata=self.admin_md,
                timeout=10,
            )
            listed.update({r.rule_id: r for r in page.rules})
            token = page.next_page_token
            if not token:
                break
        for acked in self.acked_rules:
            got = await admin.GetDiscountRule(
                admin_pb2.GetDiscountRuleRequest(rule_id=acked.rule_id),
                metadata=self.admin_md,
                timeout=5,
            )
            r = got.rule
            if (r.item_id, r.price.amount_minor) != (acked.item_id, acked.amount):
                out.append(f"{acked}: store has {r.item_id} {r.price.amount_minor}")
            if acked.rule_id not in listed:
                out.append(f"{acked}: missing from ListDiscountRules")
        return out

    async def check_final_state(self) -> dict[str, Any]:
        """Settle, then compare everything with the model; returns a summary (asserts)."""
        state = await self.settle()
        mismatches = await self.membership_mismatches()
        assert not mismatches, f"{len(mismatches)} buyers differ from the model:\n" + "\n".join(
            mismatches[:10]
        )
        assert state["dead_letters"] == self.poison_published, state
        rules = await self.rule_mismatches()
        assert not rules, "acknowledged rule writes lost:\n" + "\n".join(rules[:10])
        await self.check_strict_answers()
        return self.summary() | {"stream": state}

    async def check_strict_answers(self, timeout_s: float = 10) -> None:
        """After settling: every fan ELIGIBLE, every unfollowed buyer NOT_IN_CROWD."""
        stub = pricing_pb2_grpc.PricingServiceStub(self.channels[0])
        want = {u: pricing_pb2.VERDICT_ELIGIBLE for u in self.pop.fans} | {
            u: pricing_pb2.VERDICT_NOT_IN_CROWD for u in self.unfollow_ack_ms
        }
        deadline = time.monotonic() + timeout_s
        for user, verdict in want.items():
            while True:
                try:
                    r = await stub.CheckDiscountStrict(
                        pricing_pb2.CheckDiscountStrictRequest(user_id=user, item_id=ITEM),
                        timeout=2,
                    )
                    assert r.verdict == verdict, (user, r)
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    assert time.monotonic() < deadline, f"strict still refuses: {err.details()}"
                    await asyncio.sleep(0.05)

    def summary(self) -> dict[str, Any]:
        by: dict[str, Counter[str]] = {}
        worst: dict[str, float] = {}
        degraded = 0
        for c in self.calls:
            by.setdefault(c.method, Counter())[c.code] += 1
            worst[c.method] = max(worst.get(c.method, 0.0), c.latency_ms)
            degraded += c.degraded
        return {
            "calls": {m: dict(v) for m, v in by.items()},
            "max_latency_ms": {m: round(v, 1) for m, v in worst.items()},
            "degraded_answers": degraded,
            "events_acked": self.events_acked,
            "publish_errors": self.publish_errors,
            "rules_acked": len(self.acked_rules),
            "admin_failures": dict(self.admin_failures),
            "violations": len(self.violations),
        }

    def assert_no_violations(self) -> None:
        counts = Counter(v.what for v in self.violations)
        assert not self.violations, f"{dict(counts)}; first ones:\n" + "\n".join(
            f"{v.what}: {v.detail}" for v in self.violations[:10]
        )

    def calls_between(self, method: str, start_ms: float, end_ms: float) -> list[Call]:
        return [c for c in self.calls if c.method == method and start_ms <= c.start_ms < end_ms]

    def calls_between_all(self, start_ms: float, end_ms: float) -> list[Call]:
        return [c for c in self.calls if start_ms <= c.start_ms < end_ms]
