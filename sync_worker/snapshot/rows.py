"""Snapshot rows: parsing and validation into write batches (the loader's hot loop).

Each row writes the facts of its (buyer, seller) relation (:func:`~pricing_service.membership.
derive.snapshot_row`): the follow (version = the cut, following since ``followed_at``) and the
purchases as of the cut, each expiring at cut + membership TTL. Malformed rows are skipped and
counted per reason (a few are logged). Well-formed rows take a fast path straight to the
encoder; anything else goes to :meth:`RowParser.row`, which accepts or classifies it with the
full rules. No Redis here.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import structlog

from pricing_service.ids import id_problem
from pricing_service.membership.derive import MembershipWrite, SnapshotEncoder, Ttls, snapshot_row
from pricing_service.membership.writer import group_writes
from sync_worker.common import CLOCK_SKEW_MS, TimeFormatError, parse_rfc3339_ms
from sync_worker.snapshot.manifest import (
    COLUMNS,
    LAST_PURCHASE,
    csv_rows,
    part_format,
    pyarrow_parquet,
)

log = structlog.get_logger("sync_worker.snapshot")

SAMPLES_PER_REASON: Final = 3


class RowParser:
    """Turns raw rows into membership writes, counting malformed rows by reason."""

    def __init__(self, cut_ms: int, ttls: Ttls, max_id_length: int) -> None:
        self.cut_ms = cut_ms
        self.ttls = ttls
        self.max_id_length = max_id_length
        self.rejected: collections.Counter[str] = collections.Counter()
        self.samples: list[dict[str, Any]] = []
        self._sampled: collections.Counter[str] = collections.Counter()
        #: the fast path of well-formed rows (writes encoded by buyer, no MembershipWrite)
        self.encoder = SnapshotEncoder(cut_ms, ttls)

    def reject(self, reason: str, part: str, row_no: int, raw: object) -> None:
        self.rejected[reason] += 1
        if self._sampled[reason] < SAMPLES_PER_REASON:
            self._sampled[reason] += 1
            sample = {"reason": reason, "part": part, "row": row_no, "raw": str(raw)[:200]}
            self.samples.append(sample)
            log.warning("snapshot_row_rejected", **sample)

    @staticmethod
    def followed_ms(text: str) -> int | None:
        try:
            return parse_rfc3339_ms(text)
        except TimeFormatError:
            return None

    def row(
        self,
        user: str,
        seller: str,
        followed: str | int | None,
        count: str | int | None,
        part: str,
        row_no: int,
        out: list[MembershipWrite],
        last: str | int | None = None,
    ) -> None:
        """Append the row's writes to ``out``, or count it as rejected."""
        for which, value in (("USER_ID", user), ("SELLER_ID", seller)):
            problem = id_problem(value or "", self.max_id_length)
            if problem is not None:
                self.reject(_id_reason(which, problem), part, row_no, (user, seller))
                return
        if isinstance(followed, int):
            f_ms: int | None = followed
        elif followed:
            f_ms = self.followed_ms(followed)
        else:
            f_ms = None
        if f_ms is None:
            self.reject("BAD_FOLLOWED_AT", part, row_no, followed)
            return
        if f_ms > self.cut_ms + CLOCK_SKEW_MS:
            self.reject("FOLLOWED_AFTER_CUT", part, row_no, followed)
            return
        if isinstance(count, int):
            n = count
        elif count is None:
            self.reject("BAD_PURCHASE_COUNT", part, row_no, count)
            return
        else:
            try:
                n = int(count)
            except ValueError:
                self.reject("BAD_PURCHASE_COUNT", part, row_no, count)
                return
        if n < 0:
            self.reject("NEGATIVE_PURCHASE_COUNT", part, row_no, count)
            return
        last_ms = 0
        if last is not None and last != "":
            got = last if isinstance(last, int) else self.followed_ms(last)
            if got is None:
                self.reject("BAD_LAST_PURCHASE_AT", part, row_no, last)
                return
            if got > self.cut_ms + CLOCK_SKEW_MS:
                self.reject("LAST_PURCHASE_AFTER_CUT", part, row_no, last)
                return
            if n < 1:
                self.reject("LAST_PURCHASE_WITHOUT_COUNT", part, row_no, (count, last))
                return
            last_ms = got
        out.extend(snapshot_row(user, seller, f_ms, n, self.cut_ms, self.ttls, last_ms))


def _id_reason(which: str, problem: str) -> str:
    if problem == "MISSING_ID":
        return f"MISSING_{which}"
    return f"{problem.removesuffix('_ID')}_{which}"  # ID_TOO_LONG -> ID_TOO_LONG_USER_ID


@dataclass(slots=True)
class Batch:
    """Rows ``[start, end)`` of one part, parsed: the writes by buyer."""

    part: str
    end: int
    rows: int
    #: the writes: Lua ARGV pairs (field, value) by buyer (apply_args)
    args: dict[str, list[str | bytes]]
    #: writes dropped while encoding (outside the layout's time range), counted as stale
    stale: int
    rejected: collections.Counter[str]


def _batch(
    part: str,
    end: int,
    rows: int,
    args: dict[str, list[str | bytes]],
    slow_writes: list[MembershipWrite],
    parser: RowParser,
    rejected: collections.Counter[str],
) -> Batch:
    """A batch of the fast path's ``args`` plus the writes of rows that took the slow path
    (merges commute, so their order among the fast path's does not matter)."""
    enc = parser.encoder
    stale, enc.stale = enc.stale, 0
    if slow_writes:
        stale += group_writes(slow_writes, args)
    return Batch(part, end, rows, args, stale, rejected)


def _csv_batches(path: Path, start: int, batch_rows: int, parser: RowParser) -> Iterator[Batch]:
    name = path.name
    # The hot loop: a fast path for well-formed rows (the id rule of pricing_service.ids
    # inlined); anything else goes to RowParser.row,
    # which accepts or classifies it with the full rules.
    fromiso = datetime.fromisoformat
    cut = parser.cut_ms
    latest = cut + CLOCK_SKEW_MS
    max_len = parser.max_id_length
    add_row = parser.encoder.add
    slow = parser.row
    with path.open(newline="", encoding="utf-8") as f:
        reader, ncols = csv_rows(f, path)
        pos = 0
        for _ in range(start):  # resume: skip the rows already loaded
            if next(reader, None) is None:
                break
            pos += 1
        args: dict[str, list[str | bytes]] = {}
        writes: list[MembershipWrite] = []  # rows of the slow path
        n = 0
        before = parser.rejected.copy()
        for rec in reader:
            pos += 1
            n += 1
            if len(rec) != ncols:
                parser.reject("WRONG_COLUMN_COUNT", name, pos, rec)
            else:
                user, seller, followed, count = rec[0], rec[1], rec[2], rec[3]
                last = rec[4] if ncols == 5 else ""
                if (
                    not last
                    and 0 < len(user) <= max_len
                    and 0 < len(seller) <= max_len
                    and len(followed) >= 20
                    and count.isdecimal()
                    and user.isprintable()
                    and seller.isprintable()
                    and followed[10] in "Tt "
                ):
                    try:
                        dt = fromiso(followed)
                    except ValueError:
                        dt = None
                    if dt is not None and dt.tzinfo is not None:
                        f_ms = round(dt.timestamp() * 1_000_000) // 1000
                        if f_ms <= latest:
                            add_row(args, user, seller, f_ms, int(count))
                            if n >= batch_rows:
                                yield _batch(
                                    name, pos, n, args, writes, parser, parser.rejected - before
                                )
                                args, writes, n, before = {}, [], 0, parser.rejected.copy()
                            continue
                slow(user, seller, followed, count, name, pos, writes, last)
            if n >= batch_rows:
                yield _batch(name, pos, n, args, writes, parser, parser.rejected - before)
                args, writes, n, before = {}, [], 0, parser.rejected.copy()
        if n:
            yield _batch(name, pos, n, args, writes, parser, parser.rejected - before)


def _parquet_batches(path: Path, start: int, batch_rows: int, parser: RowParser) -> Iterator[Batch]:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.compute as pc  # noqa: PLC0415

    pq = pyarrow_parquet()
    name = path.name
    latest = parser.cut_ms + CLOCK_SKEW_MS
    max_len = parser.max_id_length
    add_row = parser.encoder.add
    pf = pq.ParquetFile(path)
    with_last = LAST_PURCHASE in pf.schema_arrow.names
    columns = [*COLUMNS, LAST_PURCHASE] if with_last else list(COLUMNS)
    pos = 0
    for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
        if pos + rb.num_rows <= start:
            pos += rb.num_rows
            continue
        if pos < start:
            rb = rb.slice(start - pos)  # noqa: PLW2901
            pos = start
        users = rb.column("user_id").to_pylist()
        sellers = rb.column("seller_id").to_pylist()
        fcol = rb.column("followed_at")
        if pa.types.is_timestamp(fcol.type):
            followed: list[Any] = pc.cast(
                pc.cast(fcol, pa.timestamp("ms", tz="UTC")), pa.int64()
            ).to_pylist()
        else:
            followed = [str(v) if v is not None else None for v in fcol.to_pylist()]
        counts = rb.column("purchase_count").to_pylist()
        lasts: list[Any] = [None] * rb.num_rows
        if with_last:
            lcol = rb.column(LAST_PURCHASE)
            if pa.types.is_timestamp(lcol.type):
                lasts = pc.cast(pc.cast(lcol, pa.timestamp("ms", tz="UTC")), pa.int64()).to_pylist()
            else:
                lasts = [str(v) if v is not None else None for v in lcol.to_pylist()]
        before = parser.rejected.copy()
        fields: dict[str, list[str | bytes]] = {}
        writes: list[MembershipWrite] = []  # rows of the slow path
        for i in range(rb.num_rows):
            u, sl, f, c, lp = users[i], sellers[i], followed[i], counts[i], lasts[i]
            # the fast path (typed columns, valid values): exactly what RowParser.row accepts
            # for these types, straight to the encoder
            if (
                lp is None
                and type(u) is str
                and type(sl) is str
                and type(f) is int
                and type(c) is int
                and 0 < len(u) <= max_len
                and 0 < len(sl) <= max_len
                and c >= 0
                and f <= latest
                and u.isprintable()
                and sl.isprintable()
            ):
                add_row(fields, u, sl, f, c)
                continue
            parser.row(
                str(u) if u is not None else "",
                str(sl) if sl is not None else "",
                f,
                c if isinstance(c, int) or c is None else str(c),
                name,
                pos + i + 1,
                writes,
                lp,
            )
        pos += rb.num_rows
        yield _batch(name, pos, rb.num_rows, fields, writes, parser, parser.rejected - before)


def part_batches(path: Path, start: int, batch_rows: int, parser: RowParser) -> Iterator[Batch]:
    if part_format(path.name) == "parquet":
        return _parquet_batches(path, start, batch_rows, parser)
    return _csv_batches(path, start, batch_rows, parser)
