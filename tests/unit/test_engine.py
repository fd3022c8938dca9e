"""The pricing decision against a brute-force reference, over generated cases."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_service.domain import Crowd, CrowdKind, Money, Rule
from pricing_service.engine import (
    Outcome,
    check_currencies,
    check_page,
    crowd_keys_to_check,
    crowds_to_check,
    decide,
    decide_page,
    member_keys,
)
from pricing_service.errors import InvalidArgumentError

NOW = 1_800_000_000_000
#: the README's order of preference on equal prices: a seller's own crowd, then purchased_fans,
#: old_fans, all_fans
SPECIFIC = {
    CrowdKind.ALL_FANS: 0,
    CrowdKind.OLD_FANS: 1,
    CrowdKind.PURCHASED_FANS: 2,
    CrowdKind.SELLER_DEFINED: 3,
}
BUILTIN = [CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS]


def rule(
    rid: str,
    kind: CrowdKind,
    amount: int,
    *,
    seller: str = "42",
    start: int | None = None,
    end: int | None = None,
    currency: str = "CNY",
    crowd_id: str = "",
) -> Rule:
    return Rule(rid, seller, "item", kind, Money(currency, amount), start, end, crowd_id=crowd_id)


windows = st.sampled_from(
    [(None, None), (NOW - 10, None), (NOW + 1, None), (None, NOW), (None, NOW + 1),
     (NOW - 5, NOW + 5), (NOW, NOW + 1), (NOW - 1, NOW)]
)  # fmt: skip


@st.composite
def rule_sets(draw: st.DrawFn) -> list[Rule]:
    n = draw(st.integers(0, 6))
    out = []
    for i in range(n):
        start, end = draw(windows)
        crowd_id = draw(st.sampled_from(["", "", "", "vip", "list-a"]))
        out.append(
            rule(
                f"r{draw(st.integers(0, 9))}{i}",
                CrowdKind.SELLER_DEFINED if crowd_id else draw(st.sampled_from(BUILTIN)),
                draw(st.integers(1, 30)),
                seller=draw(st.sampled_from(["42", "7"])),
                start=start,
                end=end,
                crowd_id=crowd_id,
            )
        )
    return out


def reference(
    list_price: Money | None, rules: list[Rule], members: frozenset[Crowd]
) -> tuple[Money | None, Rule | None]:
    """Brute force: try every rule, keep the best by the documented order."""
    applicable = []
    for r in rules:
        active = (r.start_ms is None or r.start_ms <= NOW) and (r.end_ms is None or r.end_ms > NOW)
        member = Crowd(r.seller_id, r.kind, r.crowd_id) in members
        below = list_price is None or r.price.amount_minor < list_price.amount_minor
        if active and member and below:
            applicable.append(r)
    if not applicable:
        return list_price, None
    lowest = min(r.price.amount_minor for r in applicable)
    cands = [r for r in applicable if r.price.amount_minor == lowest]
    top = max(SPECIFIC[r.kind] for r in cands)
    cands = [r for r in cands if SPECIFIC[r.kind] == top]
    best = sorted(cands, key=lambda r: r.rule_id)[0]
    return best.price, best


all_crowds = [Crowd(s, k) for s, k in itertools.product(["42", "7"], BUILTIN)] + [
    Crowd(s, CrowdKind.SELLER_DEFINED, c)
    for s, c in itertools.product(["42", "7"], ["vip", "list-a"])
]


@settings(max_examples=400)
@given(
    rules=rule_sets(),
    members=st.frozensets(st.sampled_from(all_crowds)),
    list_amount=st.none() | st.integers(0, 35),
    explain=st.booleans(),
)
def test_decision_equals_brute_force(
    rules: list[Rule], members: frozenset[Crowd], list_amount: int | None, explain: bool
) -> None:
    list_price = None if list_amount is None else Money("CNY", list_amount)
    d = decide(list_price, rules, members, NOW, explain=explain)
    want_price, want_rule = reference(list_price, rules, members)
    assert d.price == want_price
    assert d.rule == want_rule
    assert d.discounted == (want_rule is not None)
    if explain:
        assert [e.rule for e in d.evaluations] == rules
        applied = [e for e in d.evaluations if e.outcome is Outcome.APPLIED]
        assert [e.rule for e in applied] == ([want_rule] if want_rule else [])
        for e in d.evaluations:
            r = e.rule
            if r.start_ms is not None and r.start_ms > NOW:
                assert e.outcome is Outcome.NOT_STARTED
            elif r.end_ms is not None and r.end_ms <= NOW:
                assert e.outcome is Outcome.ENDED
            elif Crowd(r.seller_id, r.kind, r.crowd_id) not in members:
                assert e.outcome is Outcome.NOT_A_MEMBER
            elif list_price is not None and r.price.amount_minor >= list_price.amount_minor:
                assert e.outcome is Outcome.ABOVE_LIST_PRICE
            elif r is not want_rule:
                assert e.outcome is Outcome.OUTBID
    else:
        assert d.evaluations == ()


@given(rules=rule_sets())
def test_unknown_membership_gives_list_price(rules: list[Rule]) -> None:
    d = decide(Money("CNY", 20), rules, None, NOW, explain=True)
    assert d.price == Money("CNY", 20)
    assert d.rule is None
    assert all(
        e.outcome in (Outcome.NOT_STARTED, Outcome.ENDED, Outcome.MEMBERSHIP_UNKNOWN)
        for e in d.evaluations
    )


def test_tie_prefers_most_specific_crowd_then_rule_id() -> None:
    members = frozenset(all_crowds)
    rules = [
        rule("b", CrowdKind.ALL_FANS, 10),
        rule("c", CrowdKind.PURCHASED_FANS, 10),
        rule("a", CrowdKind.PURCHASED_FANS, 10),
        rule("z", CrowdKind.OLD_FANS, 10),
    ]
    assert decide(None, rules, members, NOW).rule == rules[2]


def test_price_equal_to_list_is_not_a_discount() -> None:
    members = frozenset(all_crowds)
    d = decide(Money("CNY", 10), [rule("a", CrowdKind.ALL_FANS, 10)], members, NOW, explain=True)
    assert not d.discounted
    assert d.evaluations[0].outcome is Outcome.ABOVE_LIST_PRICE


def test_window_is_half_open() -> None:
    members = frozenset(all_crowds)
    assert decide(None, [rule("a", CrowdKind.ALL_FANS, 5, start=NOW)], members, NOW).discounted
    assert not decide(None, [rule("a", CrowdKind.ALL_FANS, 5, end=NOW)], members, NOW).discounted


def test_crowds_to_check_only_active_rules_deduplicated() -> None:
    rules = [
        rule("a", CrowdKind.ALL_FANS, 5),
        rule("b", CrowdKind.ALL_FANS, 6),
        rule("c", CrowdKind.OLD_FANS, 5, start=NOW + 1),
        rule("d", CrowdKind.PURCHASED_FANS, 5, seller="7"),
    ]
    assert crowds_to_check([rules[:2], rules[2:]], NOW) == [
        Crowd("42", CrowdKind.ALL_FANS),
        Crowd("7", CrowdKind.PURCHASED_FANS),
    ]


def test_currency_mismatch_names_the_field() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_currencies("items[3]", Money("USD", 100), [rule("a", CrowdKind.ALL_FANS, 5)])
    assert err.value.reason == "CURRENCY_MISMATCH"
    assert err.value.violations[0].field == "items[3].list_price.currency_code"


def test_mixed_currency_rules_need_a_list_price() -> None:
    rules = [rule("a", CrowdKind.ALL_FANS, 5), rule("b", CrowdKind.OLD_FANS, 5, currency="USD")]
    with pytest.raises(InvalidArgumentError) as err:
        check_currencies("items[0]", None, rules)
    assert err.value.reason == "LIST_PRICE_REQUIRED"
    check_currencies("items[0]", None, rules[:1])  # one currency: fine


@settings(max_examples=300)
@given(
    pages=st.lists(st.tuples(rule_sets(), st.none() | st.integers(0, 35)), min_size=1, max_size=8),
    members=st.none() | st.frozensets(st.sampled_from(all_crowds)),
)
def test_page_decisions_equal_the_brute_force_per_item(
    pages: list[tuple[list[Rule], int | None]], members: frozenset[Crowd] | None
) -> None:
    """The page path's one loop (:func:`decide_page`) decides each item as the reference does,
    in page order; unknown membership (``None``) gives every item its list price."""
    queries = [
        (f"item-{i}", None if a is None else Money("CNY", a)) for i, (_, a) in enumerate(pages)
    ]
    rule_lists = [rules for rules, _ in pages]
    keys = None if members is None else member_keys(members)
    got = decide_page(queries, rule_lists, keys, NOW)
    assert len(got) == len(pages)
    for (_, list_price), rules, d in zip(queries, rule_lists, got, strict=True):
        if members is None:
            assert (d.price, d.rule) == (list_price, None)
        else:
            assert (d.price, d.rule) == reference(list_price, rules, members)
        assert d.evaluations == ()


currencies = st.sampled_from(["CNY", "CNY", "USD"])


@settings(max_examples=300)
@given(
    pages=st.lists(
        st.tuples(rule_sets(), st.none() | currencies, st.lists(currencies, max_size=6)),
        min_size=1,
        max_size=6,
    )
)
def test_page_check_equals_the_per_item_checks(
    pages: list[tuple[list[Rule], str | None, list[str]]],
) -> None:
    """:func:`check_page` refuses exactly what :func:`check_currencies` item by item refuses
    (the same field, reason and message: the first item in error), and otherwise returns the
    crowds :func:`crowd_keys_to_check` returns, in the same order."""
    queries = []
    rule_lists = []
    for i, (drawn, list_currency, rule_currencies) in enumerate(pages):
        rules = [
            Rule(r.rule_id, r.seller_id, r.item_id, r.kind, Money(c, r.price.amount_minor),
                 r.start_ms, r.end_ms, crowd_id=r.crowd_id)
            for r, c in zip(drawn, rule_currencies + ["CNY"] * len(drawn), strict=False)
        ]  # fmt: skip
        queries.append((f"item-{i}", None if list_currency is None else Money(list_currency, 50)))
        rule_lists.append(rules)
    want: InvalidArgumentError | None = None
    for i, ((_, list_price), rules) in enumerate(zip(queries, rule_lists, strict=True)):
        if rules:
            try:
                check_currencies(f"items[{i}]", list_price, rules)
            except InvalidArgumentError as exc:
                want = exc
                break
    if want is None:
        assert check_page(queries, rule_lists, NOW) == crowd_keys_to_check(rule_lists, NOW)
        return
    with pytest.raises(InvalidArgumentError) as got:
        check_page(queries, rule_lists, NOW)
    assert (got.value.reason, got.value.message) == (want.reason, want.message)
    assert [(v.field, v.reason) for v in got.value.violations] == [
        (v.field, v.reason) for v in want.violations
    ]
