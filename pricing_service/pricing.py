"""The serving path: BatchGetLowestPrice (eventual, available) and CheckDiscountStrict (strict).

Orchestrates the rule index, the membership store, the circuit breaker and the clock around the
pure engine. No proto here: servicers convert.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from pricing_service import watermark
from pricing_service.breaker import CircuitBreaker
from pricing_service.crowds import CrowdDef
from pricing_service.domain import Clock, Crowd, CrowdKey, Money, Rule
from pricing_service.engine import (
    Decision,
    check_page,
    decide_keyed,
    decide_page,
    preference,
)
from pricing_service.errors import DeadlineExceededError, PricingError, UnavailableError
from pricing_service.membership.reader import MembershipReader
from pricing_service.metrics import Metrics
from pricing_service.tracing import Tracing, mark_degraded, redis_command, rule_store_read

log = structlog.get_logger("pricing_service.pricing")

_NO_RULES: tuple[Rule, ...] = ()

_CLOCK_SPAN = {"pricing.redis.script": "clock_and_watermark"}  # the EVAL's span attributes


class RuleSource(Protocol):
    """The in-process rule index: :meth:`lookup` without I/O; :meth:`fetch` for its misses."""

    @property
    def revision(self) -> int: ...

    def lookup(self, item_ids: Iterable[str]) -> list[tuple[Rule, ...] | None]: ...

    async def fetch(self, item_ids: Sequence[str]) -> dict[str, tuple[Rule, ...]]: ...


class StrictRuleSource(Protocol):
    """The rule store itself (CheckDiscountStrict reads it directly): an item's rules, the
    seller crowds they target, and the rule revision, from one snapshot."""

    async def rules_with_crowds(
        self, item_id: str
    ) -> tuple[list[Rule], dict[CrowdKey, CrowdDef], int]: ...


class PriceQuery(NamedTuple):
    """One item of a page (a tuple: built 20-100 times per request, 3x cheaper than a dataclass)."""

    item_id: str
    list_price: Money | None


class BatchResult(NamedTuple):
    """A page's decisions in page order (a tuple: one per request, cheaper than a dataclass)."""

    decisions: list[Decision]
    degraded: bool
    rule_revision: int


class Verdict:
    """Values equal ``pricing.v1.Verdict``."""

    ELIGIBLE = 1
    NOT_IN_CROWD = 2
    NO_RULE = 3
    RULE_NOT_ACTIVE = 4
    PRICE_MISMATCH = 5


@dataclass(frozen=True, slots=True)
class StrictResult:
    verdict: int
    price: Money | None
    rule: Rule | None
    membership_as_of_ms: int
    rule_revision: int

    @property
    def eligible(self) -> bool:
        return self.verdict == Verdict.ELIGIBLE


class PricingCore:
    """Both read paths, wired to their dependencies."""

    def __init__(
        self,
        index: RuleSource,
        rules: StrictRuleSource,
        membership: MembershipReader,
        clock: Clock,
        metrics: Metrics,
        *,
        membership_budget_ms: int,
        strict_max_lag_ms: int,
        breaker: CircuitBreaker,
        rule_fetch_budget_ms: int = 100,
        rule_breaker: CircuitBreaker | None = None,
        strict_budget_ms: int = 1000,
        primary: aioredis.Redis | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.index = index
        self.rules = rules
        self.membership = membership
        self.clock = clock
        self.metrics = metrics
        self.budget_s = membership_budget_ms / 1000
        self.strict_max_lag_ms = strict_max_lag_ms
        self.strict_budget_s = strict_budget_ms / 1000
        self.breaker = breaker
        self.rule_fetch_budget_s = rule_fetch_budget_ms / 1000
        self.rule_breaker = rule_breaker or CircuitBreaker(5, 1.0)
        self._rule_outage_logged = False
        self.primary = primary or membership.redis
        self._rtt = metrics.redis_rtt.child("batch_lookup")
        self._outage_logged = False
        self.tracing = tracing

    def _degraded(self, cause: str) -> None:
        """A page answered (partly) at list prices: counted, and its span marked."""
        self.metrics.degraded_answers.labels(cause).inc()
        if self.tracing is not None:
            mark_degraded(cause)

    # --- BatchGetLowestPrice ------------------------------------------------------------------
    async def batch(
        self,
        user_id: str,
        queries: Sequence[PriceQuery],
        *,
        explain: bool,
        time_remaining_s: float | None,
    ) -> BatchResult:
        index = self.index
        revision = index.revision
        found = index.lookup([q.item_id for q in queries])
        degraded = False
        if None in found:
            start = time.perf_counter()
            rule_lists, degraded = await self._fetch_misses(queries, found, time_remaining_s)
            if time_remaining_s is not None:
                time_remaining_s -= time.perf_counter() - start
        else:
            rule_lists = found  # type: ignore[assignment]  # no None in it
        now = self.clock.now_ms()
        # the currencies checked (INVALID_ARGUMENT for the first item in error) and the crowds
        # of the page's active rules collected, in one pass
        crowds = check_page(queries, rule_lists, now)
        keys: frozenset[CrowdKey] | None = frozenset()
        reasons: dict[CrowdKey, str] | None = {} if explain else None
        if user_id and crowds:
            keys = await self._lookup(user_id, crowds, time_remaining_s, reasons)
            if keys is None:
                degraded = True
        if not explain:
            return BatchResult(decide_page(queries, rule_lists, keys, now), degraded, revision)
        decisions = [
            decide_keyed(q.list_price, rules, keys, now, explain=True, reasons=reasons)
            for q, rules in zip(queries, rule_lists, strict=True)
        ]
        return BatchResult(decisions, degraded, revision)

    async def _fetch_misses(
        self,
        queries: Sequence[PriceQuery],
        found: list[tuple[Rule, ...] | None],
        time_remaining_s: float | None,
    ) -> tuple[list[tuple[Rule, ...]], bool]:
        """Read the items a bounded index does not hold, within budget. When the rule store
        cannot answer in time those items get no rules (list price) and the page is degraded."""
        missing = [q.item_id for q, rules in zip(queries, found, strict=True) if rules is None]
        fetched: dict[str, tuple[Rule, ...]] | None = None
        if not self.rule_breaker.allow():
            self._degraded("rule_breaker_open")
        else:
            budget = self.rule_fetch_budget_s
            if time_remaining_s is not None:
                budget = min(budget, max(time_remaining_s * 0.5 - 0.001, 0.0))
            started = self.rule_breaker.now()
            try:
                async with asyncio.timeout(budget):
                    fetched = await self.index.fetch(missing)
            except (TimeoutError, PricingError, OSError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                if not timed_out or budget >= self.rule_fetch_budget_s:
                    # a timeout cut short by the caller's own deadline says nothing of the store
                    self.rule_breaker.failure(started)
                cause = "rule_store_timeout" if timed_out else "rule_store_error"
                self._degraded(cause)
                if not self._rule_outage_logged:
                    self._rule_outage_logged = True
                    log.warning("rule_fetch_degraded", cause=cause, error=repr(exc))
            else:
                self.rule_breaker.success()
                if self._rule_outage_logged:
                    self._rule_outage_logged = False
                    log.info("rule_fetch_recovered")
        if fetched is None:
            return [_NO_RULES if rules is None else rules for rules in found], True
        return [
            fetched[q.item_id] if rules is None else rules
            for q, rules in zip(queries, found, strict=True)
        ], False

    async def _lookup(
        self,
        user_id: str,
        crowds: list[CrowdKey],
        time_remaining_s: float | None,
        reasons: dict[CrowdKey, str] | None = None,
    ) -> frozenset[CrowdKey] | None:
        """One membership round trip within budget; ``None`` means degrade to list prices.
        ``reasons`` (explain) receives why the buyer is in each crowd or not."""
        if not self.breaker.allow():
            self._degraded("breaker_open")
            return None
        budget = self.budget_s
        if time_remaining_s is not None:
            # keep a little of the caller's deadline to build and send the answer
            budget = min(budget, max(time_remaining_s * 0.8 - 0.001, 0.0))
        started = self.breaker.now()
        start = time.perf_counter()
        try:
            members = await self.membership.member_keys(
                user_id, crowds, timeout_s=budget, reasons=reasons
            )
        except (TimeoutError, RedisError, OSError) as exc:
            self.breaker.failure(started)
            cause = "timeout" if isinstance(exc, TimeoutError) else "redis_error"
            self._degraded(cause)
            if not self._outage_logged:
                self._outage_logged = True
                log.warning("membership_degraded", cause=cause, error=repr(exc))
            return None
        self.metrics.redis_rtt.observe(self._rtt, time.perf_counter() - start)
        self.breaker.success()
        if self._outage_logged:
            self._outage_logged = False
            log.info("membership_recovered")
        return members

    # --- CheckDiscountStrict ------------------------------------------------------------------
    async def strict(
        self,
        user_id: str,
        item_id: str,
        expected_price: Money | None,
        rule_id: str,
        *,
        time_remaining_s: float | None,
    ) -> StrictResult:
        try:
            async with asyncio.timeout(self._strict_budget(time_remaining_s, share=0.5)):
                with rule_store_read(self.tracing, 1):
                    rules, definitions, revision = await self.rules.rules_with_crowds(item_id)
        except TimeoutError:
            self.metrics.strict_refusals.labels("RULE_STORE_TIMEOUT").inc()
            raise UnavailableError(
                "the rule store did not answer in time; not granting an unproven discount",
                reason="RULE_STORE_TIMEOUT",
            ) from None
        if rule_id and not any(r.rule_id == rule_id for r in rules):
            return StrictResult(Verdict.NO_RULE, None, None, 0, revision)
        if not rules:
            return StrictResult(Verdict.NO_RULE, None, None, 0, revision)
        now = self.clock.now_ms()
        active = [r for r in rules if r.active(now)]
        wanted = next((r for r in rules if r.rule_id == rule_id), None) if rule_id else None
        if not active or (wanted is not None and not wanted.active(now)):
            return StrictResult(Verdict.RULE_NOT_ACTIVE, None, wanted, 0, revision)
        as_of, members = await self._strict_membership(
            user_id, active, definitions, time_remaining_s
        )
        applicable = [r for r in active if r.crowd in members]
        if expected_price is not None:
            applicable = [r for r in applicable if r.price.currency == expected_price.currency] or (
                applicable
            )
        if not applicable or (wanted is not None and wanted.crowd not in members):
            return StrictResult(Verdict.NOT_IN_CROWD, None, wanted, as_of, revision)
        best = min(applicable, key=preference)
        if (wanted is not None and best.rule_id != wanted.rule_id) or (
            expected_price is not None and expected_price != best.price
        ):
            return StrictResult(Verdict.PRICE_MISMATCH, best.price, best, as_of, revision)
        return StrictResult(Verdict.ELIGIBLE, best.price, best, as_of, revision)

    def _strict_budget(self, time_remaining_s: float | None, *, share: float) -> float:
        """Time a strict dependency may take: its budget, and never the caller's whole deadline
        (a refusal that arrives after the deadline is no refusal)."""
        budget = self.strict_budget_s
        if time_remaining_s is not None:
            budget = min(budget, max(time_remaining_s * share - 0.005, 0.001))
        return budget

    async def _strict_membership(
        self,
        user_id: str,
        active: list[Rule],
        definitions: dict[CrowdKey, CrowdDef],
        time_remaining_s: float | None,
    ) -> tuple[int, frozenset[Crowd]]:
        """Watermark first, then membership, both from the primary: fail closed. Seller crowds
        are decided with the definitions read from the store with the rules."""
        crowds = list(dict.fromkeys(r.crowd for r in active))
        if time_remaining_s is not None and time_remaining_s <= 0:
            raise DeadlineExceededError("deadline expired before membership could be read")
        timeout = self._strict_budget(time_remaining_s, share=0.9)
        try:
            async with asyncio.timeout(timeout):
                # TIME and the watermark from the same node in one step: on Redis Cluster
                # TIME has no key, so it must run where the watermark key lives
                with redis_command(self.tracing, "EVAL", _CLOCK_SPAN):
                    reading = await watermark.read(
                        self.primary, self.membership.layout.watermark_key
                    )
                with redis_command(self.tracing, "HMGET", {"pricing.crowds": len(crowds)}):
                    members = await self.membership.member_crowds(
                        user_id, crowds, redis=self.primary, resolve=definitions
                    )
        except TimeoutError:
            self.metrics.strict_refusals.labels("REDIS_TIMEOUT").inc()
            raise UnavailableError(
                "membership could not be read from Redis in time; not granting an unproven discount",
                reason="REDIS_TIMEOUT",
            ) from None
        except (RedisError, OSError) as exc:
            self.metrics.strict_refusals.labels("REDIS_UNAVAILABLE").inc()
            raise UnavailableError(
                f"Redis is unavailable ({type(exc).__name__}); not granting an unproven discount",
                reason="REDIS_UNAVAILABLE",
            ) from None
        if reading.watermark_ms is None or reading.lag_ms is None:
            self.metrics.strict_refusals.labels("SYNC_WATERMARK_MISSING").inc()
            raise UnavailableError(
                "the sync worker has published no watermark: membership freshness is unproven",
                reason="SYNC_WATERMARK_MISSING",
            )
        lag = reading.lag_ms
        if lag > self.strict_max_lag_ms:
            self.metrics.strict_refusals.labels("SYNC_LAGGING").inc()
            raise UnavailableError(
                f"the sync worker is {lag} ms behind (limit {self.strict_max_lag_ms} ms): "
                "recent relation events may not be applied",
                reason="SYNC_LAGGING",
                metadata={"lag_ms": str(lag), "max_lag_ms": str(self.strict_max_lag_ms)},
            )
        return reading.watermark_ms, members
