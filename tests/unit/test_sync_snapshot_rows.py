"""Snapshot row parsing, part selection, checkpoint encoding and progress output (no I/O)."""

from __future__ import annotations

import collections
import io

import pytest

from pricing_service.errors import InvalidArgumentError
from pricing_service.membership.derive import DAY_MS, FactWrite, MembershipWrite, Ttls
from pricing_service.membership.layout import Facts, Follow, Purchases
from sync_worker.snapshot import LoadReport, PartProgress, Progress, RowParser, SnapshotLoader

CUT = 1_760_000_000_000
TTLS = Ttls.from_seconds(3600, 7200, 30)


def parse(*row: str | int | None) -> tuple[list[MembershipWrite], collections.Counter[str]]:
    p = RowParser(CUT, TTLS, 8)
    out: list[MembershipWrite] = []
    last = row[4] if len(row) > 4 else None
    p.row(row[0], row[1], row[2], row[3], "part.csv", 1, out, last)  # type: ignore[arg-type]
    return out, p.rejected


def test_a_row_is_the_follow_since_followed_at_as_of_the_cut() -> None:
    out, rejected = parse("u1", "42", "2025-10-01T00:00:00Z", "0")
    assert not rejected
    [w] = out
    assert isinstance(w, FactWrite) and (w.user_id, w.seller_id) == ("u1", "42")
    assert w.facts == Facts(Follow(CUT, False, CUT + 3_600_000, 1_759_276_800_000))


def test_purchases_are_the_count_as_of_the_cut_and_the_last_time_when_known() -> None:
    followed = CUT - 30 * DAY_MS
    [w], rejected = parse("u1", "42", followed, 3)
    assert not rejected and isinstance(w, FactWrite)
    assert w.facts.purchases == Purchases(CUT + 3_600_000, 3, 0)
    [w], _ = parse("u1", "42", followed, "2", "2025-10-08T00:00:00Z")
    assert isinstance(w, FactWrite)
    assert w.facts.purchases == Purchases(CUT + 3_600_000, 2, 1_759_881_600_000)


@pytest.mark.parametrize(
    ("last", "count", "reason"),
    [
        ("yesterday", "1", "BAD_LAST_PURCHASE_AT"),
        ("2030-01-01T00:00:00Z", "1", "LAST_PURCHASE_AFTER_CUT"),
        ("2025-10-08T00:00:00Z", "0", "LAST_PURCHASE_WITHOUT_COUNT"),
    ],
)
def test_bad_last_purchase_times_are_rejected(last: str, count: str, reason: str) -> None:
    out, rejected = parse("u1", "42", "2025-10-01T00:00:00Z", count, last)
    assert out == [] and rejected == {reason: 1}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (("", "42", "2025-10-01T00:00:00Z", "0"), "MISSING_USER_ID"),
        (("u1", "", "2025-10-01T00:00:00Z", "0"), "MISSING_SELLER_ID"),
        (("u123456789", "42", "2025-10-01T00:00:00Z", "0"), "ID_TOO_LONG_USER_ID"),
        (("u1", "4\x002", "2025-10-01T00:00:00Z", "0"), "INVALID_SELLER_ID"),
        (("u1", "42", "", "0"), "BAD_FOLLOWED_AT"),
        (("u1", "42", "2025-10-01", "0"), "BAD_FOLLOWED_AT"),
        (("u1", "42", "2025-10-01T00:00:00", "0"), "BAD_FOLLOWED_AT"),
        (("u1", "42", "2025-02-30T00:00:00Z", "0"), "BAD_FOLLOWED_AT"),
        (("u1", "42", "2030-01-01T00:00:00Z", "0"), "FOLLOWED_AFTER_CUT"),
        (("u1", "42", "2025-10-01T00:00:00Z", "x"), "BAD_PURCHASE_COUNT"),
        (("u1", "42", "2025-10-01T00:00:00Z", ""), "BAD_PURCHASE_COUNT"),
        (("u1", "42", "2025-10-01T00:00:00Z", None), "BAD_PURCHASE_COUNT"),
        (("u1", "42", "2025-10-01T00:00:00Z", "-1"), "NEGATIVE_PURCHASE_COUNT"),
        (("u1", "42", "2025-10-01T00:00:00Z", -3), "NEGATIVE_PURCHASE_COUNT"),
    ],
)
def test_malformed_rows_are_rejected_with_a_reason(
    row: tuple[str, str, str, str | int | None], reason: str
) -> None:
    out, rejected = parse(*row)
    assert out == []
    assert rejected == {reason: 1}


def test_samples_are_bounded_per_reason() -> None:
    p = RowParser(CUT, TTLS, 8)
    out: list[MembershipWrite] = []
    for i in range(10):
        p.row("", "42", "2025-10-01T00:00:00Z", "0", "p.csv", i, out)
    assert p.rejected == {"MISSING_USER_ID": 10}
    assert len(p.samples) == 3
    assert p.samples[0]["row"] == 0


def test_select_parts() -> None:
    files = ["a", "b", "c", "d", "e"]
    assert SnapshotLoader.select_parts(files) == files
    assert SnapshotLoader.select_parts(files, parts=[3, 0, 3]) == ["a", "d"]
    assert SnapshotLoader.select_parts(files, worker_index=1, workers=2) == ["b", "d"]
    assert SnapshotLoader.select_parts(files, worker_index=0, workers=2) == ["a", "c", "e"]
    with pytest.raises(InvalidArgumentError) as exc:
        SnapshotLoader.select_parts(files, parts=[5])
    assert exc.value.reason == "BAD_PART_INDEX"
    with pytest.raises(InvalidArgumentError):
        SnapshotLoader.select_parts(files, worker_index=2, workers=2)


def test_part_progress_round_trip_and_garbage() -> None:
    pp = PartProgress(10, 20, 3, collections.Counter({"BAD_FOLLOWED_AT": 2}))
    back = PartProgress.loads(pp.dumps().encode())
    assert (back.offset, back.written, back.stale, back.rejected) == (10, 20, 3, pp.rejected)
    assert PartProgress.loads(None).offset == 0
    assert PartProgress.loads(b"{not json").offset == 0
    assert PartProgress.loads(b'{"written": 3}').offset == 0


def test_report_rates_and_ok() -> None:
    r = LoadReport("id", "t", rows_read=100, memberships_written=250, duration_s=2.0)
    d = r.as_dict()
    assert (d["rows_per_s"], d["memberships_per_s"], d["rejected_total"]) == (50, 125, 0)
    assert r.ok
    r.status = "error_rate_exceeded"
    assert not r.ok


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress(1000, stream=out, tty=True)
    bar.update(500, force=True)
    bar.close()
    text = out.getvalue()
    assert "500/1,000 rows" in text
    assert "rows/s" in text
    assert "ETA" in text
    assert text.endswith("\n")
