"""Derivation of membership records from facts, and the TTL configuration rules (no I/O)."""

from __future__ import annotations

import pytest

from pricing_service.config import load_settings
from pricing_service.domain import Crowd, CrowdKind
from pricing_service.errors import ConfigError
from pricing_service.membership import derive
from pricing_service.membership.derive import DAY_MS, MembershipWrite, Ttls

T = Ttls(membership_ms=1_000_000, tombstone_ms=2_000_000, old_fan_min_ms=30 * DAY_MS)
NOW = 1_750_000_000_000
ALL, OLD, PUR = CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS


def test_follow_makes_an_all_fans_member() -> None:
    assert derive.follow("u", "42", NOW, T) == [
        MembershipWrite("u", Crowd("42", ALL), False, NOW, NOW + T.membership_ms)
    ]


def test_unfollow_tombstones_all_three_crowds_of_the_seller() -> None:
    writes = derive.unfollow("u", "42", NOW, T)
    assert {w.crowd for w in writes} == {Crowd("42", k) for k in CrowdKind}
    for w in writes:
        assert w.tombstone and w.requires is None
        assert (w.version_ms, w.expires_ms) == (NOW, NOW + T.tombstone_ms)


def test_purchase_is_purchased_fans_only_for_a_current_fan() -> None:
    assert derive.purchase("u", "42", NOW, T) == [
        MembershipWrite(
            "u",
            Crowd("42", PUR),
            False,
            NOW,
            NOW + T.membership_ms,
            requires=Crowd("42", ALL),
        )
    ]


@pytest.mark.parametrize(
    ("followed_before_cut_ms", "purchases", "kinds"),
    [
        (0, 0, {ALL}),
        (30 * DAY_MS - 1, 0, {ALL}),  # one ms short of OLD_FAN_MIN_DAYS
        (30 * DAY_MS, 0, {ALL, OLD}),  # exactly OLD_FAN_MIN_DAYS: old fan
        (400 * DAY_MS, 0, {ALL, OLD}),
        (0, 1, {ALL, PUR}),
        (0, 7, {ALL, PUR}),
        (30 * DAY_MS, 1, {ALL, OLD, PUR}),
        (-5, 0, {ALL}),  # followed after the cut (clock skew in the export): not old
    ],
)
def test_snapshot_row(followed_before_cut_ms: int, purchases: int, kinds: set[CrowdKind]) -> None:
    cut = NOW
    writes = derive.snapshot_row("u", "s", cut - followed_before_cut_ms, purchases, cut, T)
    assert {w.crowd.kind for w in writes} == kinds
    assert len(writes) == len(kinds)
    for w in writes:
        assert w.user_id == "u" and w.crowd.seller_id == "s"
        assert not w.tombstone and w.requires is None  # the export already knows they follow
        assert (w.version_ms, w.expires_ms) == (cut, cut + T.membership_ms)


def test_ttls_from_seconds() -> None:
    assert Ttls.from_seconds(60, 120, 30) == Ttls(60_000, 120_000, 30 * DAY_MS)


def test_default_ttls_are_48_hours() -> None:
    s = load_settings()
    assert s.membership_ttl_s == s.tombstone_ttl_s == 48 * 3600
    assert s.tombstone_ttl_s >= s.snapshot_max_age_s


def test_startup_refuses_tombstones_shorter_than_the_oldest_acceptable_snapshot() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(tombstone_ttl_s=3600, snapshot_max_age_s=7200)
    msg = str(err.value)
    assert "PRICING_TOMBSTONE_TTL_S" in msg and "PRICING_SNAPSHOT_MAX_AGE_S" in msg
    assert "bring the relation back" in msg  # says why, not just that
    assert load_settings(tombstone_ttl_s=7200, snapshot_max_age_s=7200).tombstone_ttl_s == 7200


@pytest.mark.parametrize("name", ["membership_ttl_s", "tombstone_ttl_s"])
def test_ttls_beyond_the_layout_range_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=name.upper()):
        load_settings(**{name: 5_000_000})
