"""The snapshot fast path encodes exactly the writes of the reference path (no I/O).

``SnapshotEncoder.add`` must produce, buyer by buyer and in order, the fields whose triples
``(field, SnapshotEncoder.value, '')`` are the Lua ARGV that ``MembershipStore.apply`` sends for
``derive.snapshot_row`` (via ``group_writes``): every snapshot write carries the one value and no
condition, which is what ``apply_same_value`` relies on. And it must count the same writes as
stale when the cut is outside the layout's time range.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_service.membership import derive
from pricing_service.membership.derive import DAY_MS, SnapshotEncoder, Ttls
from pricing_service.membership.layout import EPOCH_MS, MAX_VERSION_MS, LayoutError
from pricing_service.membership.store import group_writes

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
    st.integers(EPOCH_MS + 1, EPOCH_MS + 40 * 365 * DAY_MS),
    st.sampled_from([EPOCH_MS - 1, EPOCH_MS, EPOCH_MS + 1, 0, MAX_VERSION_MS + 1]),
)
rows = st.lists(
    st.tuples(ids, sellers, st.integers(-(10**4), 10**4), st.integers(0, 3)), max_size=40
)


def as_triples(got: dict[str, list[str]], value: str | None) -> dict[str, list[str]]:
    """The encoder's fields as the general write path's triples."""
    assert value is not None or not got
    return {u: [a for f in fields for a in (f, value or "", "")] for u, fields in got.items()}


def reference(
    rs: list[tuple[str, str, int, int]], cut: int, t: Ttls
) -> tuple[dict[str, list[str]], int]:
    by_user: dict[str, list[str]] = {}
    writes = [w for u, s, f, n in rs for w in derive.snapshot_row(u, s, f, n, cut, t)]
    return by_user, group_writes(writes, by_user)


@settings(max_examples=300, deadline=None)
@given(rows, cuts, ttls, st.integers(0, 2))
def test_encoder_equals_snapshot_row_then_group_writes(
    rs: list[tuple[str, str, int, int]], cut: int, t: Ttls, day_shift: int
) -> None:
    # followed_at near the old-fan boundary: minutes around cut - old_fan_min (and +day_shift)
    rs = [(u, s, cut - t.old_fan_min_ms + f * 60_000 - day_shift * DAY_MS, n) for u, s, f, n in rs]
    ref, ref_stale = reference(rs, cut, t)
    enc = SnapshotEncoder(cut, t)
    got: dict[str, list[str]] = {}
    for u, s, f, n in rs:
        enc.add(got, u, s, f, n)
    assert as_triples(got, enc.value) == ref
    assert list(got) == list(ref)  # buyers in first-seen order
    assert enc.stale == ref_stale


def test_exact_old_fan_boundary_and_purchase_threshold() -> None:
    t = Ttls.from_seconds(3600, 7200, 30)
    enc = SnapshotEncoder(CUT, t)
    got: dict[str, list[str]] = {}
    enc.add(got, "a", "42", CUT - 30 * DAY_MS, 0)  # exactly 30 days: old fan
    enc.add(got, "b", "42", CUT - 30 * DAY_MS + 1, 1)  # 1 ms short: not old; bought once
    enc.add(got, "c", "42", CUT, 0)
    assert as_triples(got, enc.value) == reference(
        [("a", "42", CUT - 30 * DAY_MS, 0), ("b", "42", CUT - 30 * DAY_MS + 1, 1),
         ("c", "42", CUT, 0)], CUT, t,
    )[0]  # fmt: skip
    assert [got[u] for u in "abc"] == [["169", "170"], ["169", "171"], ["169"]]


def test_lists_are_not_shared_between_buyers() -> None:
    enc = SnapshotEncoder(CUT, Ttls.from_seconds(3600, 7200, 30))
    got: dict[str, list[str]] = {}
    enc.add(got, "a", "42", CUT, 0)
    enc.add(got, "b", "42", CUT, 0)
    enc.add(got, "a", "43", CUT, 1)
    assert len(got["a"]) == 3 and len(got["b"]) == 1
    enc.add(got, "c", "42", CUT, 0)
    assert got["c"] == got["b"] and got["c"] is not got["b"]


def test_a_cut_before_the_epoch_writes_nothing_and_counts_every_write_stale() -> None:
    enc = SnapshotEncoder(EPOCH_MS, Ttls.from_seconds(3600, 7200, 30))
    got: dict[str, list[str]] = {}
    enc.add(got, "a", "42", EPOCH_MS - 31 * DAY_MS, 2)  # all three crowds
    enc.add(got, "b", "42", EPOCH_MS, 0)
    assert got == {}
    assert enc.stale == 4


def test_an_unencodable_ttl_fails_on_the_first_write_like_the_store() -> None:
    t = Ttls(membership_ms=10**13, tombstone_ms=10**13, old_fan_min_ms=0)
    enc = SnapshotEncoder(CUT, t)  # constructing is fine (a snapshot may have no valid row)
    with pytest.raises(LayoutError):
        enc.add({}, "a", "42", CUT, 0)
    with pytest.raises(LayoutError):
        group_writes(derive.snapshot_row("a", "42", CUT, 0, CUT, t), {})
