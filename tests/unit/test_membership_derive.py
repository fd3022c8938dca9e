"""What each source of facts writes, and the TTL configuration rules (no I/O)."""

from __future__ import annotations

import pytest

from pricing_service.config import load_settings
from pricing_service.errors import ConfigError
from pricing_service.membership import derive
from pricing_service.membership.derive import DAY_MS, FactWrite, ListWrite, Ttls
from pricing_service.membership.layout import Facts, Follow, Purchases

T = Ttls(membership_ms=1_000_000, tombstone_ms=2_000_000, old_fan_min_ms=30 * DAY_MS)
NOW = 1_750_000_000_000


def test_follow_is_following_since_its_own_time() -> None:
    assert derive.follow("u", "42", NOW, T) == [
        FactWrite("u", "42", Facts(Follow(NOW, False, NOW + T.membership_ms, NOW)))
    ]


def test_unfollow_is_a_tombstone_that_lives_the_tombstone_ttl() -> None:
    assert derive.unfollow("u", "42", NOW, T) == [
        FactWrite("u", "42", Facts(Follow(NOW, True, NOW + T.tombstone_ms)))
    ]


def test_a_purchase_is_recorded_whatever_the_follow_state() -> None:
    # no condition: the purchase fact alone (the defect of issue 14 was a conditional write)
    assert derive.purchase("u", "42", NOW, T) == [
        FactWrite("u", "42", Facts(None, Purchases(NOW + T.membership_ms, 1, NOW)))
    ]


@pytest.mark.parametrize(("purchases", "last"), [(0, 0), (1, 0), (7, 0), (3, NOW - DAY_MS)])
def test_snapshot_row_is_the_follow_and_the_purchases_as_of_the_cut(
    purchases: int, last: int
) -> None:
    cut = NOW
    followed = cut - 40 * DAY_MS
    [w] = derive.snapshot_row("u", "s", followed, purchases, cut, T, last)
    assert isinstance(w, FactWrite)
    assert (w.user_id, w.seller_id) == ("u", "s")
    assert w.facts.follow == Follow(cut, False, cut + T.membership_ms, followed)
    if purchases:
        assert w.facts.purchases == Purchases(cut + T.membership_ms, purchases, last)
    else:
        assert w.facts.purchases is None  # "no purchase" is not a fact: it never erases one


def test_list_changes_add_forever_and_remove_for_the_tombstone_ttl() -> None:
    assert derive.list_change("u", 7, NOW, removed=False, ttls=T) == ListWrite(
        "u", 7, NOW, False, 0
    )
    assert derive.list_change("u", 7, NOW, removed=True, ttls=T) == ListWrite(
        "u", 7, NOW, True, T.tombstone_ms // 1000
    )


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
