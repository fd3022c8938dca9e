"""The membership layout's encodings: round trips, canonical forms and refusals (no I/O)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from pricing_service import config
from pricing_service.domain import Crowd, CrowdKind
from pricing_service.membership.layout import (
    APPLY_LUA,
    EPOCH_MS,
    MAX_TTL_S,
    MAX_VERSION_MS,
    LayoutError,
    MembershipLayout,
    Record,
)

L = MembershipLayout

seller_ids = st.one_of(
    st.integers(0, 10**20).map(str),
    st.integers(0, 10**6).map(lambda n: "0" + str(n)),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
crowds = st.builds(Crowd, seller_ids, st.sampled_from(CrowdKind))


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
    ["", "0", "4", "1", "2", "012", "1_0", "+5", " 5", "5 ", "x12", "A12", "4000000000000001"],
)
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
