"""Predicate crowds against a brute-force reference over generated relations and clocks (no I/O).

The reference walks the README's definition literally: the buyer follows the seller (the follow
part is a live follow), has followed for at least / at most N whole days, bought at least K
times, bought within the last D days - each condition checked by counting days with
``timedelta`` arithmetic rather than the implementation's millisecond thresholds. The
evaluation the page path uses (:func:`holds_hot` over the memoised tuple), the one the strict
path and explain use (:meth:`Predicate.holds`) and explain's words must all agree with it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_service.crowds import Predicate, builtin_predicates, holds_hot, hot
from pricing_service.domain import CrowdKind
from pricing_service.membership.layout import EPOCH_MS, Facts, Follow, Purchases

NOW = EPOCH_MS + 1000 * 86_400_000  # a fixed "today"; times are generated around it
DAY = 86_400_000


def dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def reference(p: Predicate, facts: Facts | None, now_ms: int) -> bool:
    now = dt(now_ms)
    f = facts.follow if facts is not None else None
    if f is None or f.tombstone or dt(f.expires_ms) <= now:
        return False  # "follows the seller": a live follow, not an unfollow
    followed_for = now - dt(f.since_ms)
    if p.min_follow_days and followed_for < timedelta(days=p.min_follow_days):
        return False
    if p.max_follow_days is not None and followed_for > timedelta(days=p.max_follow_days):
        return False
    needs_purchase = p.min_purchases > 0 or p.purchased_within_days is not None
    if not needs_purchase:
        return True
    b = facts.purchases if facts is not None else None
    if b is None or dt(b.expires_ms) <= now:
        return False  # nothing known about purchases
    if b.count < p.min_purchases:
        return False
    if p.purchased_within_days is not None:
        if b.last_ms == 0:
            return False  # the time of the last purchase is unknown
        if now - dt(b.last_ms) > timedelta(days=p.purchased_within_days):
            return False
    return True


# offsets from NOW: many exactly on day boundaries (and 1 ms around them), where bugs live
boundary = st.one_of(
    st.integers(-40, 40).map(lambda d: d * DAY),
    st.integers(-40, 40).flatmap(lambda d: st.sampled_from([d * DAY - 1, d * DAY + 1])),
    st.integers(-40 * DAY, 40 * DAY),
)
follows = st.builds(
    lambda tomb, v, e, s: Follow(NOW + v, tomb, NOW + e, 0 if tomb else NOW + s),
    st.booleans(),
    boundary,
    boundary,
    boundary,
)
purchases = st.builds(
    lambda e, c, last: Purchases(NOW + e, c, 0 if last is None else NOW + last),
    boundary,
    st.integers(1, 12),
    st.none() | boundary,
)
facts = st.none() | st.builds(Facts, st.none() | follows, st.none() | purchases)
predicates = st.builds(
    Predicate,
    min_follow_days=st.sampled_from([0, 0, 1, 7, 30]),
    max_follow_days=st.sampled_from([None, None, 1, 7, 30]),
    min_purchases=st.sampled_from([0, 0, 1, 2, 5]),
    purchased_within_days=st.sampled_from([None, None, 1, 7, 30]),
)


@settings(max_examples=3000)
@given(
    predicates,
    facts,
    st.integers(-3, 3).map(lambda d: NOW + d * DAY) | boundary.map(lambda o: NOW + o),
)
def test_predicates_equal_the_brute_force_reference(
    p: Predicate, f: Facts | None, now: int
) -> None:
    want = reference(p, f, now)
    assert holds_hot(p.thresholds, hot(f), now) == want  # the page path
    assert p.holds(f, now) == want  # the strict path
    assert p.explain(f, now).startswith("in the crowd") == want  # explain says why


@settings(max_examples=500)
@given(facts, boundary.map(lambda o: NOW + o), st.integers(0, 60))
def test_the_built_in_crowds_are_the_readmes_definitions(
    f: Facts | None, now: int, old_days: int
) -> None:
    b = builtin_predicates(old_days)
    follows_ = reference(Predicate(), f, now)
    assert b[CrowdKind.ALL_FANS].holds(f, now) == follows_
    assert b[CrowdKind.OLD_FANS].holds(f, now) == reference(
        Predicate(min_follow_days=old_days), f, now
    )
    assert b[CrowdKind.PURCHASED_FANS].holds(f, now) == reference(
        Predicate(min_purchases=1), f, now
    )


def test_the_reasons_read_as_the_issue_asks() -> None:
    twelve = Facts(Follow(NOW - 12 * DAY, False, NOW + DAY, NOW - 12 * DAY))
    assert Predicate(min_follow_days=30).explain(twelve, NOW) == (
        "followed 12 days ago, this crowd needs 30"
    )
    two = Facts(twelve.follow, Purchases(NOW + DAY, 2, NOW - DAY))
    assert Predicate(min_purchases=3).explain(two, NOW) == "2 purchases, needs 3"
    assert (
        Predicate(purchased_within_days=1).explain(
            Facts(twelve.follow, Purchases(NOW + DAY, 2, NOW - 3 * DAY)), NOW
        )
        == "last purchase 3 days ago, this crowd needs one within 1 days"
    )
    gone = Facts(Follow(NOW - DAY, True, NOW + DAY))
    assert Predicate().explain(gone, NOW) == "not following the seller (unfollowed 1 day ago)"
    assert Predicate().explain(None, NOW) == "not following the seller"


def test_followed_for_n_days_turns_true_on_the_nth_day() -> None:
    """The issue's example: decided at read time, no snapshot needed."""
    since = NOW - 30 * DAY
    f = Facts(Follow(since, False, NOW + DAY, since))
    p = Predicate(min_follow_days=30)
    assert not p.holds(f, NOW - 1)
    assert p.holds(f, NOW)
