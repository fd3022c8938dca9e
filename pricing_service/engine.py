"""The pricing decision: pure, no I/O, no clock of its own.

For one item: among the rules that are active at ``now`` (validity window ``[start, end)``) and
whose crowd contains the buyer, the lowest price wins; ties go to the most specific crowd
(a seller-defined crowd > purchased_fans > old_fans > all_fans), then to the smallest rule id.
A rule price that is not below the list price is not applied. Crowds are identified by
:data:`~pricing_service.domain.CrowdKey` tuples (``Rule.crowd_key``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import NamedTuple

from pricing_service.domain import Crowd, CrowdKey, CrowdKind, Money, Rule
from pricing_service.errors import InvalidArgumentError


class Outcome(enum.IntEnum):
    """What happened to a candidate rule (values equal ``pricing.v1.RuleOutcome``)."""

    APPLIED = 1
    NOT_A_MEMBER = 2
    NOT_STARTED = 3
    ENDED = 4
    ABOVE_LIST_PRICE = 5
    OUTBID = 6
    MEMBERSHIP_UNKNOWN = 7


@dataclass(frozen=True, slots=True)
class Evaluation:
    rule: Rule
    outcome: Outcome
    #: why the buyer is in the rule's crowd or not (when membership was read)
    reason: str = ""


class Decision(NamedTuple):
    """The price of one item for one buyer (a tuple: one per item on the hot path, cheap to build)."""

    price: Money | None
    rule: Rule | None
    evaluations: tuple[Evaluation, ...] = ()

    @property
    def discounted(self) -> bool:
        return self.rule is not None


_SPECIFICITY = {kind: kind.specificity for kind in CrowdKind}


def preference(rule: Rule) -> tuple[int, int, str]:
    """Sort key of applicable rules: lowest price, then most specific crowd, then rule id."""
    return (rule.price.amount_minor, -rule.kind.specificity, rule.rule_id)


def key_crowd(key: CrowdKey) -> Crowd:
    seller, ref = key
    if isinstance(ref, str):
        return Crowd(seller, CrowdKind.SELLER_DEFINED, ref)
    return Crowd(seller, ref)


def crowds_to_check(rule_lists: Iterable[Sequence[Rule]], now_ms: int) -> list[Crowd]:
    """The distinct crowds of every active rule: what one membership lookup must answer."""
    return [key_crowd(k) for k in crowd_keys_to_check(rule_lists, now_ms)]


def crowd_keys_to_check(rule_lists: Iterable[Sequence[Rule]], now_ms: int) -> list[CrowdKey]:
    """:func:`crowds_to_check` as crowd keys (hashed in C, no ``Crowd`` built): the form
    :meth:`MembershipStore.member_keys` reads and :func:`decide_keyed` tests."""
    seen: dict[CrowdKey, None] = {}
    for rules in rule_lists:
        for r in rules:
            start, end = r.start_ms, r.end_ms
            if (start is None or start <= now_ms) and (end is None or now_ms < end):
                seen[r.crowd_key] = None
    return list(seen)


def member_keys(members: Iterable[Crowd]) -> frozenset[CrowdKey]:
    """``members`` as crowd keys: the form :func:`decide_keyed` tests."""
    return frozenset([c.key for c in members])


def check_currencies(field: str, list_price: Money | None, rules: Sequence[Rule]) -> None:
    """A list price in another currency than the item's rules is the caller's error."""
    if list_price is None:
        currencies = {r.price.currency for r in rules}
        if len(currencies) > 1:
            raise InvalidArgumentError.field(
                field + ".list_price",
                f"required: this item's rules use several currencies ({', '.join(sorted(currencies))})",
                "LIST_PRICE_REQUIRED",
            )
        return
    for r in rules:
        if r.price.currency != list_price.currency:
            raise InvalidArgumentError.field(
                field + ".list_price.currency_code",
                f"{list_price.currency} does not match the item's price currency {r.price.currency}",
                "CURRENCY_MISMATCH",
            )


def decide(
    list_price: Money | None,
    rules: Sequence[Rule],
    members: frozenset[Crowd] | None,
    now_ms: int,
    *,
    explain: bool = False,
) -> Decision:
    """Price one item. ``members`` is ``None`` when membership is unknown (degraded answer).

    Currencies must have been checked with :func:`check_currencies`.
    """
    if not rules:
        return Decision(list_price, None)
    keys = None if members is None else member_keys(members)
    return decide_keyed(list_price, rules, keys, now_ms, explain=explain)


def decide_keyed(
    list_price: Money | None,
    rules: Sequence[Rule],
    members: AbstractSet[CrowdKey] | None,
    now_ms: int,
    *,
    explain: bool = False,
    reasons: Mapping[CrowdKey, str] | None = None,
) -> Decision:
    """:func:`decide` with the buyer's crowds as crowd keys (:func:`member_keys`).

    One item, with explanations if asked (``reasons``: why the buyer is in each crowd or
    not); without them it is :func:`decide_page` of a one-item page, the page path's form.
    """
    if not rules:
        return Decision(list_price, None)
    if explain:
        return _decide_explained(list_price, rules, members, now_ms, reasons or {})
    return decide_page((("", list_price),), (rules,), members, now_ms)[0]


def check_page(
    queries: Sequence[tuple[str, Money | None]],
    rule_lists: Sequence[Sequence[Rule]],
    now_ms: int,
) -> list[CrowdKey]:
    """A page's :func:`check_currencies` (raising for the first item in error, as ``items[i]``)
    and its :func:`crowd_keys_to_check`, in one pass over the page's rules.

    ``queries`` are ``(item_id, list_price)`` pairs in page order, ``rule_lists`` their rules.
    """
    seen: dict[CrowdKey, None] = {}
    for i, (query, rules) in enumerate(zip(queries, rule_lists, strict=True)):
        if not rules:
            continue
        list_price = query[1]
        currency = list_price.currency if list_price is not None else None
        for r in rules:
            if currency is not None and r.price.currency != currency:
                check_currencies(f"items[{i}]", list_price, rules)  # raises
            start, end = r.start_ms, r.end_ms
            if (start is None or start <= now_ms) and (end is None or now_ms < end):
                seen[r.crowd_key] = None
        if currency is None and len(rules) > 1:
            check_currencies(f"items[{i}]", None, rules)  # raises for several currencies
    return list(seen)


def decide_page(
    queries: Sequence[tuple[str, Money | None]],
    rule_lists: Sequence[Sequence[Rule]],
    members: AbstractSet[CrowdKey] | None,
    now_ms: int,
) -> list[Decision]:
    """:func:`decide_keyed` without explanations for every item of a page, in one loop (the
    page path's form: one call per page instead of one per item, measured in bench.serving).
    """
    out: list[Decision] = []
    append = out.append
    specificity = _SPECIFICITY
    new = tuple.__new__  # Decision(...) without the NamedTuple's Python-level __new__
    for query, rules in zip(queries, rule_lists, strict=True):
        list_price = query[1]
        if not rules or members is None:
            append(new(Decision, (list_price, None, ())))
            continue
        best: Rule | None = None
        best_amount = 0
        best_spec = 0
        limit = list_price.amount_minor if list_price is not None else None
        for r in rules:
            start, end = r.start_ms, r.end_ms
            if (
                (start is not None and now_ms < start)
                or (end is not None and now_ms >= end)
                or r.crowd_key not in members
            ):
                continue
            amount = r.price.amount_minor
            if limit is not None and amount >= limit:
                continue
            if best is None or amount < best_amount:
                best, best_amount, best_spec = r, amount, specificity[r.kind]
            elif amount == best_amount:
                spec = specificity[r.kind]
                if spec > best_spec or (spec == best_spec and r.rule_id < best.rule_id):
                    best, best_spec = r, spec
        append(new(Decision, (list_price, None, ()) if best is None else (best.price, best, ())))
    return out


def _decide_explained(
    list_price: Money | None,
    rules: Sequence[Rule],
    members: AbstractSet[CrowdKey] | None,
    now_ms: int,
    reasons: Mapping[CrowdKey, str],
) -> Decision:
    best: Rule | None = None
    best_key: tuple[int, int, str] | None = None
    outcomes: list[tuple[Rule, Outcome]] = []
    limit = list_price.amount_minor if list_price is not None else None
    for r in rules:
        if r.start_ms is not None and now_ms < r.start_ms:
            outcome = Outcome.NOT_STARTED
        elif r.end_ms is not None and now_ms >= r.end_ms:
            outcome = Outcome.ENDED
        elif members is None:
            outcome = Outcome.MEMBERSHIP_UNKNOWN
        elif r.crowd_key not in members:
            outcome = Outcome.NOT_A_MEMBER
        elif limit is not None and r.price.amount_minor >= limit:
            outcome = Outcome.ABOVE_LIST_PRICE
        else:
            key = preference(r)
            if best_key is None or key < best_key:
                best, best_key = r, key
            outcome = Outcome.OUTBID  # corrected below for the winner
        outcomes.append((r, outcome))
    evaluations = tuple(
        Evaluation(r, Outcome.APPLIED if r is best else o, reasons.get(r.crowd_key, ""))
        for r, o in outcomes
    )
    if best is None:
        return Decision(list_price, None, evaluations)
    return Decision(best.price, best, evaluations)
