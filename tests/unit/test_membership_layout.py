"""The membership layout's encodings: round trips, canonical forms and refusals (no I/O)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from pricing_service import config
from pricing_service.domain import Crowd, CrowdKind
from pricing_service.membership.layout import (
    EPOCH_MS,
    MAX_TTL_S,
    MAX_VERSION_MS,
    Facts,
    Follow,
    LayoutError,
    MembershipLayout,
    Purchases,
    Record,
    legacy_facts,
    merge_facts,
)
from pricing_service.membership.lua import APPLY_LUA

L = MembershipLayout

seller_ids = st.one_of(
    st.integers(0, 10**20).map(str),
    st.integers(0, 10**6).map(lambda n: "0" + str(n)),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
LEGACY_KINDS = [CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS]
crowds = st.builds(Crowd, seller_ids, st.sampled_from(LEGACY_KINDS))


@given(crowds)
def test_crowd_field_round_trips(crowd: Crowd) -> None:
    field = L.crowd_field(crowd)
    assert L.field_crowd(field) == crowd
    assert L.field_crowd(field.encode()) == crowd


@given(crowds, crowds)
def test_distinct_crowds_get_distinct_fields(a: Crowd, b: Crowd) -> None:
    assert (L.crowd_field(a) == L.crowd_field(b)) == (a == b)


@pytest.mark.parametrize(
    ("seller", "kind", "field"),
    [
        ("42", CrowdKind.ALL_FANS, "169"),
        ("42", CrowdKind.OLD_FANS, "170"),
        ("42", CrowdKind.PURCHASED_FANS, "171"),
        ("1", CrowdKind.ALL_FANS, "5"),
        ("999999999999999", CrowdKind.PURCHASED_FANS, "3999999999999999"),  # 15 digits: numeric
        ("1000000000000000", CrowdKind.ALL_FANS, "a1000000000000000"),  # 16 digits: text
        ("0042", CrowdKind.OLD_FANS, "o0042"),  # leading zeros are kept verbatim
        ("0", CrowdKind.ALL_FANS, "a0"),
        ("shop-x", CrowdKind.PURCHASED_FANS, "pshop-x"),
        ("\u0664\u0662", CrowdKind.ALL_FANS, "a\u0664\u0662"),  # non-ASCII digits are text
        ("", CrowdKind.ALL_FANS, "a"),
    ],
)
def test_crowd_field_forms(seller: str, kind: CrowdKind, field: str) -> None:
    assert L.crowd_field(Crowd(seller, kind)) == field
    assert L.field_crowd(field) == Crowd(seller, kind)


@pytest.mark.parametrize(
    "field",
    ["", "0", "4", "1", "2", "012", "1_0", "+5", " 5", "5 ", "x12", "A12", "4000000000000001",
     "168", "fshop", "-5"],
)  # fmt: skip
def test_field_crowd_refuses_what_crowd_field_never_writes(field: str) -> None:
    with pytest.raises(LayoutError):
        L.field_crowd(field)
    with pytest.raises(LayoutError):
        L.field_crowd(field.encode())


def test_field_crowd_refuses_bytes_that_are_not_utf8() -> None:
    with pytest.raises(LayoutError):
        L.field_crowd(b"a\xff\xfe")


@given(
    version=st.integers(EPOCH_MS + 1, MAX_VERSION_MS),
    ttl_ms=st.integers(0, MAX_TTL_S * 1000),
    tombstone=st.booleans(),
)
def test_value_round_trips(version: int, ttl_ms: int, tombstone: bool) -> None:
    value = L.encode(version, version + ttl_ms, tombstone=tombstone)
    rec = L.decode(value)
    assert rec == L.decode(value.encode()) == L.decode(int(value))
    assert rec.version_ms == version
    assert rec.tombstone is tombstone
    assert rec.expires_ms == version + -(-ttl_ms // 1000) * 1000  # rounded up to the second
    assert 8 <= len(value) <= 19
    assert int(value) < 2**63  # Redis keeps it as an int64 inside the listpack


@pytest.mark.parametrize(
    ("ttl_ms", "stored_ms"), [(0, 0), (1, 1000), (999, 1000), (1000, 1000), (1001, 2000), (-5, 0)]
)
def test_expiry_is_rounded_up_to_whole_seconds(ttl_ms: int, stored_ms: int) -> None:
    v = EPOCH_MS + 123_456_789
    assert L.decode(L.encode(v, v + ttl_ms, tombstone=False)).expires_ms == v + stored_ms


@pytest.mark.parametrize(
    ("version", "expires"),
    [
        (EPOCH_MS, EPOCH_MS + 1000),  # the epoch itself is outside the range
        (EPOCH_MS - 1, EPOCH_MS + 1000),
        (0, 1000),
        (MAX_VERSION_MS + 1, MAX_VERSION_MS + 1000),
        (EPOCH_MS + 1, EPOCH_MS + 1 + (MAX_TTL_S + 1) * 1000),  # ttl too long
    ],
)
def test_encode_refuses_unrepresentable(version: int, expires: int) -> None:
    with pytest.raises(LayoutError):
        L.encode(version, expires, tombstone=False)


def test_encode_accepts_the_extremes() -> None:
    v = MAX_VERSION_MS
    assert L.decode(L.encode(v, v + MAX_TTL_S * 1000, tombstone=True)) == Record(
        True, v, v + MAX_TTL_S * 1000
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "1234567",  # too short to hold a version
        "01234567890",
        " 12345678901",
        "12345678901 ",
        "1_2345678901",
        "-12345678901",
        "+12345678901",
        "12345678901.0",
        "0x1234567890",
        "1e20",
        "12345678901234567890",  # 20 digits
        "9223372036854775808",  # 19 digits, above int64
        "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669",  # non-ASCII digits
        b"\xff\xff\xff\xff\xff\xff\xff\xff",
        -12345678901,
    ],
)
def test_decode_refuses_corrupt_values(value: str | bytes | int) -> None:
    with pytest.raises(LayoutError):
        L.decode(value)


def test_record_liveness_boundary() -> None:
    r = Record(tombstone=False, version_ms=10, expires_ms=100)
    assert r.is_member(99) and r.is_live(99)
    assert not r.is_member(100) and not r.is_live(100)  # expiry is exclusive
    t = Record(tombstone=True, version_ms=10, expires_ms=100)
    assert t.is_live(99) and not t.is_member(99)


@given(seller_ids)
def test_fact_fields_round_trip_and_never_collide_with_legacy_fields(seller: str) -> None:
    f = L.fact_field(seller)
    assert L.parse_field(f) == ("facts", seller)
    assert f not in L.legacy_fields(seller)
    for legacy in L.legacy_fields(seller):
        assert L.parse_field(legacy)[0] == "legacy"


@pytest.mark.parametrize(
    ("seller", "field"), [("42", "168"), ("1", "4"), ("0042", "f0042"), ("shop", "fshop")]
)
def test_fact_field_forms(seller: str, field: str) -> None:
    assert L.fact_field(seller) == field


def test_list_fields_are_negative_integers() -> None:
    assert L.list_field(17) == "-17"
    assert L.parse_field("-17") == ("list", 17)
    for bad in (0, -1, 10**15):
        with pytest.raises(LayoutError):
            L.list_field(bad)
    for field in ("-0", "-", "-01", "--1"):
        with pytest.raises(LayoutError):
            L.parse_field(field)


def test_keys_are_namespaced_and_hash_tagged() -> None:
    lay = MembershipLayout("ns:")
    assert lay.user_key("u1") == "ns:cm:{u1}"
    assert lay.user_from_key(lay.user_key("a{b}c")) == "a{b}c"
    assert lay.watermark_key == "ns:sync:watermark"
    assert lay.snapshot_checkpoint_key("s1") == "ns:sync:snapshot:{s1}"
    assert lay.user_key_pattern() == "ns:cm:{*"
    with pytest.raises(LayoutError):
        lay.user_from_key("other:cm:{u1}")


def test_layout_limits_match_the_configuration_bounds() -> None:
    assert config.MAX_TTL_S == MAX_TTL_S
    assert str(EPOCH_MS) in APPLY_LUA and "%EPOCH%" not in APPLY_LUA


# --- fact values -------------------------------------------------------------------------------
times = st.integers(EPOCH_MS + 1, MAX_VERSION_MS)
follows = st.builds(
    Follow,
    version_ms=times,
    tombstone=st.booleans(),
    expires_ms=times,
    since_ms=st.integers(0, EPOCH_MS + 10**12),
).map(lambda f: Follow(f.version_ms, f.tombstone, f.expires_ms, 0 if f.tombstone else f.since_ms))
purchases = st.builds(
    Purchases, expires_ms=times, count=st.integers(1, 70_000), last_ms=st.integers(0, EPOCH_MS * 2)
)
facts = st.builds(Facts, st.none() | follows, st.none() | purchases).filter(
    lambda f: f.follow is not None or f.purchases is not None
)


def stored(f: Facts) -> Facts:
    """The documented precision: expiries and the follow start up, the last purchase down."""

    def up(ms: int) -> int:
        return -(-ms // 1000) * 1000

    fo, p = f.follow, f.purchases
    return Facts(
        None
        if fo is None
        else Follow(
            fo.version_ms, fo.tombstone, up(fo.expires_ms), 0 if fo.tombstone else up(fo.since_ms)
        ),
        None
        if p is None
        else Purchases(up(p.expires_ms), min(p.count, 65_535), p.last_ms // 1000 * 1000),
    )


@given(facts)
def test_fact_values_round_trip_at_the_documented_precision(f: Facts) -> None:
    raw = L.encode_facts(f)
    assert L.decode_facts(raw) == stored(f)
    assert len(raw) == 1 + (0 if f.follow is None else 9 if f.follow.tombstone else 13) + (
        0 if f.purchases is None else 10
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 14,  # no part
        b"\x02" + b"\x00" * 9,  # a tombstone without a follow part
        b"\x08" + b"\x00" * 13,  # an unknown flag
        b"\x01" + b"\x00\x00\x00\x01" + b"\x00" * 5 + b"\x00" * 4,  # version 0
        b"\x01" + b"\x00" * 12,  # one byte short
        b"\x01" + b"\x01" * 14,  # one byte long
        b"\x04" + b"\x00\x00\x00\x01" + b"\x00\x00" + b"\x00" * 4,  # purchase count 0
    ],
)
def test_decode_facts_refuses_corrupt_values(raw: bytes) -> None:
    with pytest.raises(LayoutError):
        L.decode_facts(raw)


def test_encode_facts_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(LayoutError):
        L.encode_facts(Facts())
    with pytest.raises(LayoutError):
        L.encode_facts(Facts(Follow(EPOCH_MS, False, EPOCH_MS + 1000, EPOCH_MS)))
    with pytest.raises(LayoutError):
        L.encode_facts(Facts(None, Purchases(EPOCH_MS + 1000, 0)))


NOW = EPOCH_MS + 1000


@given(facts, facts, facts)
def test_the_merge_is_commutative_associative_and_idempotent(a: Facts, b: Facts, c: Facts) -> None:
    a, b, c = stored(a), stored(b), stored(c)
    m = merge_facts
    assert m(a, b, NOW) == m(b, a, NOW)
    assert m(m(a, b, NOW), c, NOW) == m(a, m(b, c, NOW), NOW)
    assert m(a, a, NOW) == a.live(NOW)
    ab = m(a, b, NOW)
    if ab is not None:  # the merge of stored values is itself representable as stored
        assert L.decode_facts(L.encode_facts(ab)) == ab


def test_the_follow_part_is_last_writer_wins_and_purchases_are_maxima() -> None:
    t = EPOCH_MS + 10**9
    follow = Facts(Follow(t, False, t + 10**6, t - 5000))
    unfollow = Facts(Follow(t + 1, True, t + 10**6))
    bought = Facts(None, Purchases(t + 10**6, 1, t + 2000))
    counted = Facts(None, Purchases(t + 5 * 10**5, 4, 0))
    merged = merge_facts(merge_facts(follow, bought, t), counted, t)
    assert merged == Facts(follow.follow, Purchases(t + 10**6, 4, t + 2000))
    assert merged is not None
    assert merge_facts(merged, unfollow, t) == Facts(unfollow.follow, merged.purchases)
    tie = Facts(Follow(t, True, t + 10**6))
    assert merge_facts(follow, tie, t) == tie  # equal times: the unfollow wins


def test_legacy_records_convert_to_the_facts_they_certify() -> None:
    t = EPOCH_MS + 10**10
    day = 86_400_000
    a = Record(False, t, t + 10**6)
    o = Record(False, t, t + 10**6)
    p = Record(False, t, t + 10**6)
    got = legacy_facts(a, o, p, 30 * day, t)
    assert got == Facts(Follow(t, False, t + 10**6, t - 30 * day), Purchases(t + 10**6, 1, 0))
    assert legacy_facts(a, None, None, 30 * day, t) == Facts(Follow(t, False, t + 10**6, t))
    tomb = Record(True, t, t + 10**6)
    assert legacy_facts(tomb, tomb, tomb, 30 * day, t) == Facts(Follow(t, True, t + 10**6))
    assert legacy_facts(None, o, None, 30 * day, t) is None  # old_fans alone certifies nothing
    assert legacy_facts(a, o, p, 30 * day, t + 10**6) is None  # all expired
