"""The snapshot fast path encodes exactly the writes of the reference path (no I/O).

``SnapshotEncoder.add`` must produce, buyer by buyer and in order, the (field, value) pairs that
``MembershipStore.apply`` sends for ``derive.snapshot_row`` (via ``group_writes``), and count the
same writes as stale when the cut is outside the layout's time range.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_service.membership import derive
from pricing_service.membership.derive import DAY_MS, SnapshotEncoder, Ttls
from pricing_service.membership.layout import EPOCH_MS, MAX_VERSION_MS, MembershipLayout
from pricing_service.membership.writer import group_writes

CUT = 1_760_000_000_000

ids = st.sampled_from(["u1", "u2", "42", "7", "0", "007", "s-x", "é", "a" * 20, "999999999999999"])
sellers = st.one_of(
    st.integers(1, 10**15 - 1).map(str),
    st.sampled_from(["0", "01", "x", "s-1", "1" * 16, "9" * 15, "42", "١٢", "4²", " 42", "+4"]),
)
ttls = st.builds(
    Ttls,
    membership_ms=st.integers(60_000, 10**9),
    tombstone_ms=st.integers(60_000, 10**9),
    old_fan_min_ms=st.integers(0, 400).map(lambda d: d * DAY_MS),
)
cuts = st.one_of(
    st.integers(EPOCH_MS + 1, EPOCH_MS + 29 * 365 * DAY_MS),
    st.sampled_from([EPOCH_MS - 1, EPOCH_MS, EPOCH_MS + 1, 0, MAX_VERSION_MS + 1]),
)
rows = st.lists(
    st.tuples(
        ids,
        sellers,
        st.integers(-(10**12), 10**9),  # followed at, relative to the cut (even before 1970)
        st.sampled_from([0, 1, 2, 3, 65_535, 65_536, 10**9]),
        st.sampled_from([0, 0, 1, 999, 1000, 10**8]),  # last purchase, before the cut
    ),
    max_size=40,
)


def reference(
    rs: list[tuple[str, str, int, int, int]], cut: int, t: Ttls
) -> tuple[dict[str, list[str | bytes]], int]:
    by_user: dict[str, list[str | bytes]] = {}
    writes = [
        w
        for u, s, f, n, last in rs
        for w in derive.snapshot_row(u, s, f, n, cut, t, last if n else 0)
    ]
    return by_user, group_writes(writes, by_user)


@settings(max_examples=300, deadline=None)
@given(rows, cuts, ttls)
def test_encoder_equals_snapshot_row_then_group_writes(
    rs: list[tuple[str, str, int, int, int]], cut: int, t: Ttls
) -> None:
    rs = [(u, s, cut + f, n, cut - last if last else 0) for u, s, f, n, last in rs]
    ref, ref_stale = reference(rs, cut, t)
    enc = SnapshotEncoder(cut, t)
    got: dict[str, list[str | bytes]] = {}
    for u, s, f, n, last in rs:
        enc.add(got, u, s, f, n, last if n else 0)
    assert got == ref
    assert list(got) == list(ref)  # buyers in first-seen order
    assert enc.stale == ref_stale


def test_one_field_per_relation_and_the_follow_start_in_the_value() -> None:
    t = Ttls.from_seconds(3600, 7200, 30)
    enc = SnapshotEncoder(CUT, t)
    got: dict[str, list[str | bytes]] = {}
    enc.add(got, "a", "42", CUT - 30 * DAY_MS, 0)
    enc.add(got, "a", "shop", CUT - 1, 2)
    assert got["a"][0] == "168" and got["a"][2] == "fshop"  # seller * 4; f<seller>
    lay = MembershipLayout
    a, b = lay.decode_facts(got["a"][1]), lay.decode_facts(got["a"][3])  # type: ignore[arg-type]
    assert a.follow is not None and a.follow.since_ms == CUT - 30 * DAY_MS
    assert a.purchases is None
    assert b.follow is not None and b.follow.since_ms == CUT  # rounded up to the second
    assert b.purchases is not None and (b.purchases.count, b.purchases.last_ms) == (2, 0)


def test_lists_are_not_shared_between_buyers() -> None:
    enc = SnapshotEncoder(CUT, Ttls.from_seconds(3600, 7200, 30))
    got: dict[str, list[str | bytes]] = {}
    enc.add(got, "a", "42", CUT, 0)
    enc.add(got, "b", "42", CUT, 0)
    enc.add(got, "a", "43", CUT, 1)
    assert len(got["a"]) == 4 and len(got["b"]) == 2
    enc.add(got, "c", "42", CUT, 0)
    assert got["c"] == got["b"] and got["c"] is not got["b"]


def test_a_cut_before_the_epoch_writes_nothing_and_counts_every_write_stale() -> None:
    enc = SnapshotEncoder(EPOCH_MS, Ttls.from_seconds(3600, 7200, 30))
    got: dict[str, list[str | bytes]] = {}
    enc.add(got, "a", "42", EPOCH_MS - 31 * DAY_MS, 2)
    enc.add(got, "b", "42", EPOCH_MS, 0)
    assert got == {}
    assert enc.stale == 2
    assert not enc.valid
