"""Offline sync: load a T+1 snapshot of follow relations into crowd membership.

A snapshot is a directory with ``manifest.json``::

    {"snapshot_time": "2025-06-01T00:00:00Z", "files": ["part-0000.csv", ...], "rows": 123}

and part files: CSV with the header ``user_id,seller_id,followed_at,purchase_count``
(``followed_at`` RFC 3339), optionally followed by ``,last_purchase_at`` (RFC 3339 or empty:
the time of the buyer's last purchase from the seller, which crowds like "bought within 30
days" need), or Parquet (``.parquet``, needs the ``parquet`` extra: pyarrow) with the same
columns (times as timestamps or RFC 3339 strings).

Before anything is written the whole snapshot is validated: the manifest, every part's format
and header, and a counting pass over every part whose total must equal ``rows`` (Parquet:
footer metadata). A snapshot whose cut is older than ``snapshot_max_age_s`` (it could resurrect
relations whose unfollow tombstones have expired) or in the future is refused.

Each row writes the facts of its (buyer, seller) relation (:func:`~pricing_service.membership.
derive.snapshot_row`): the follow (version = the cut, following since ``followed_at``) and the
purchases as of the cut, each expiring at cut + membership TTL, merged order-independently, so
loading a snapshot again, or after a crash, changes nothing. Progress is checkpointed per part
in the hash ``MembershipLayout.snapshot_checkpoint_key(snapshot_id)`` (field = part file name,
value = JSON ``{"offset": rows done, "written", "stale", "rejected": {reason: n}}``), written
after each batch's writes succeeded: a load killed at any moment resumes from the last
checkpoint and replays at most one batch, harmlessly. Parts can be split between processes
(``parts=``); each part must be loaded by one process at a time.

Malformed rows are skipped and counted per reason (a few are logged). As soon as the rows
rejected exceed ``snapshot_max_error_rate`` of the rows to load, the load stops: the final rate
could only be higher.

Rows are parsed in a reader thread while the previous batch is in Redis, so the Python work and
the Redis work overlap; memory holds at most a few batches whatever the snapshot size.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import csv
import functools
import hashlib
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TextIO

import redis.asyncio as aioredis
import structlog

from pricing_service.config import Settings
from pricing_service.domain import Clock, SystemClock
from pricing_service.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from pricing_service.membership.derive import MembershipWrite, SnapshotEncoder, Ttls, snapshot_row
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.membership.writer import ApplyResult, group_writes
from sync_worker.common import TimeFormatError, format_rfc3339_ms, id_problem, parse_rfc3339_ms

log = structlog.get_logger("sync_worker.snapshot")

MANIFEST: Final = "manifest.json"
COLUMNS: Final = ("user_id", "seller_id", "followed_at", "purchase_count")
#: The optional fifth column.
LAST_PURCHASE: Final = "last_purchase_at"
HEADER: Final = ",".join(COLUMNS)
#: A ``followed_at`` may be this much later than the cut (clocks of the exporting systems).
CLOCK_SKEW_MS: Final = 5 * 60 * 1000
SAMPLES_PER_REASON: Final = 3
_OUTAGE_ERRORS: Final[tuple[type[BaseException], ...]] = (ConnectionError, OSError)


def _redis_outage_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RCE  # noqa: PLC0415
    from redis.exceptions import TimeoutError as RTE  # noqa: PLC0415

    from pricing_service.redis_client import TRANSIENT_ERRORS  # noqa: PLC0415

    # TRANSIENT_ERRORS: also a cluster node failing over (CLUSTERDOWN), a slot migrating
    return (RCE, RTE, *_OUTAGE_ERRORS, *TRANSIENT_ERRORS)


OUTAGE_ERRORS: Final = _redis_outage_errors()


# --- manifest ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated snapshot manifest (part names are plain file names inside ``directory``)."""

    directory: Path
    snapshot_time_ms: int
    files: tuple[str, ...]
    rows: int

    def part_path(self, name: str) -> Path:
        return self.directory / name


def _bad(field_: str, description: str, reason: str) -> InvalidArgumentError:
    return InvalidArgumentError.field(field_, description, reason)


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and check ``manifest.json`` and that its parts exist (row counts: :func:`count_rows`)."""
    d = Path(directory)
    if not d.is_dir():
        raise _bad("snapshot", f"{d} is not a directory", "NOT_A_DIRECTORY")
    path = d / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(MANIFEST, f"{path} does not exist", "MISSING_MANIFEST") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(MANIFEST, f"cannot read {path}: {exc}", "BAD_MANIFEST") from None
    if not isinstance(doc, dict):
        raise _bad(MANIFEST, "must be a JSON object", "BAD_MANIFEST")
    st = doc.get("snapshot_time")
    if not isinstance(st, str):
        raise _bad("manifest.snapshot_time", "must be an RFC 3339 UTC string", "BAD_SNAPSHOT_TIME")
    try:
        cut = parse_rfc3339_ms(st)
    except TimeFormatError as exc:
        raise _bad("manifest.snapshot_time", str(exc), "BAD_SNAPSHOT_TIME") from None
    files = doc.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise _bad("manifest.files", "must be a non-empty list of file names", "BAD_FILES")
    if len(set(files)) != len(files):
        raise _bad("manifest.files", "lists a file twice", "DUPLICATE_FILE")
    for i, name in enumerate(files):
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == MANIFEST:
            raise _bad(f"manifest.files[{i}]", f"{name!r} is not a plain file name", "BAD_FILES")
        if not (d / name).is_file():
            raise _bad(f"manifest.files[{i}]", f"{d / name} does not exist", "MISSING_PART")
        if part_format(name) is None:
            raise _bad(
                f"manifest.files[{i}]", f"{name!r}: parts must be .csv or .parquet", "BAD_FORMAT"
            )
    rows = doc.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise _bad("manifest.rows", "must be a non-negative integer", "BAD_ROWS")
    return Manifest(d, cut, tuple(files), rows)


def part_format(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".parquet"):
        return "parquet"
    return None


def _csv_rows(f: TextIO, path: Path) -> tuple[Iterator[list[str]], int]:
    """CSV records after checking the header (refuses the part when it is wrong), and the
    number of columns (4, or 5 with ``last_purchase_at``)."""
    reader = csv.reader(f)
    header = next(reader, None)
    names = [h.strip().lstrip("\ufeff") for h in header or []]
    if names not in (list(COLUMNS), [*COLUMNS, LAST_PURCHASE]):
        raise _bad(
            path.name,
            f"header must be {HEADER!r} (optionally ,{LAST_PURCHASE}), "
            f"got {','.join(header or [])!r}",
            "BAD_HEADER",
        )
    return filter(None, reader), len(names)  # blank lines (empty records) are not rows


def count_rows(path: Path) -> int:
    """Data rows of one part (CSV: a counting pass; Parquet: footer metadata)."""
    if part_format(path.name) == "parquet":
        pq = _pyarrow_parquet()
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise _bad(path.name, f"missing columns {missing}", "BAD_HEADER")
        return int(pf.metadata.num_rows)
    fast = _count_plain_csv(path)
    if fast is not None:
        return fast
    with path.open(newline="", encoding="utf-8") as f:
        n = 0
        for _ in _csv_rows(f, path)[0]:
            n += 1
        return n


_NOT_PLAIN = (b'"', b"\r", b"\x00", b"\n\n")
_CHUNK = 1 << 20


def _count_plain_csv(path: Path) -> int | None:
    """Data rows of a *plain* CSV part (UTF-8, ``\\n`` line ends, no quotes, NULs or blank
    lines: what exporters write), counting line ends in bytes, ~10 x faster than parsing; for
    such a file one line is one record, so this equals the parsing count. ``None`` for any other
    file: the caller parses it (and reports its errors as it always did)."""
    with path.open(newline="", encoding="utf-8") as f:
        _csv_rows(f, path)  # the header check (refuses a wrong header)
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    last = b"\n"  # as if a line end preceded the file: a leading blank line is not plain
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            if any(bad in chunk for bad in _NOT_PLAIN) or (last == b"\n" and chunk[:1] == b"\n"):
                return None
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                return None
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    if last != b"\n":
        lines += 1  # a last line without a line end
    return lines - 1  # the header


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError:
        raise FailedPreconditionError(
            "Parquet parts need pyarrow: pip install 'crowd-pricing[parquet]'",
            reason="PARQUET_UNSUPPORTED",
        ) from None
    return pq


def snapshot_id(manifest: Manifest, counts: Sequence[int]) -> str:
    """Identity of a snapshot for its checkpoints: cut time, part names and row counts."""
    text = json.dumps([manifest.snapshot_time_ms, list(manifest.files), list(counts)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --- rows ----------------------------------------------------------------------------------------
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
        max_len = self.max_id_length
        if not user or len(user) > max_len or not user.isprintable():
            self.reject(
                _id_reason("USER_ID", id_problem(user or "", max_len)), part, row_no, (user, seller)
            )
            return
        if not seller or len(seller) > max_len or not seller.isprintable():
            self.reject(
                _id_reason("SELLER_ID", id_problem(seller or "", max_len)),
                part,
                row_no,
                (user, seller),
            )
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


def _id_reason(which: str, problem: str | None) -> str:
    if problem == "MISSING_ID" or problem is None:
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
    # The hot loop: a fast path for well-formed rows; anything else goes to RowParser.row,
    # which accepts or classifies it with the full rules.
    fromiso = datetime.fromisoformat
    cut = parser.cut_ms
    latest = cut + CLOCK_SKEW_MS
    max_len = parser.max_id_length
    add_row = parser.encoder.add
    slow = parser.row
    with path.open(newline="", encoding="utf-8") as f:
        reader, ncols = _csv_rows(f, path)
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

    pq = _pyarrow_parquet()
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


# --- checkpoints -----------------------------------------------------------------------------------
@dataclass(slots=True)
class PartProgress:
    offset: int = 0
    written: int = 0
    stale: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)

    def dumps(self) -> str:
        return json.dumps(
            {
                "offset": self.offset,
                "written": self.written,
                "stale": self.stale,
                "rejected": dict(self.rejected),
            },
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, raw: bytes | str | None) -> PartProgress:
        if raw is None:
            return cls()
        try:
            d = json.loads(raw)
            return cls(
                int(d["offset"]),
                int(d.get("written", 0)),
                int(d.get("stale", 0)),
                collections.Counter({str(k): int(v) for k, v in d.get("rejected", {}).items()}),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("snapshot_checkpoint_unreadable", raw=str(raw)[:200])
            return cls()


# --- report -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class LoadReport:
    """What one run of the loader did."""

    snapshot_id: str
    snapshot_time: str
    #: loaded | already_loaded | nothing_to_do (ok) | error_rate_exceeded | write_failures
    status: str = "loaded"
    parts: list[str] = field(default_factory=list)
    parts_skipped_done: list[str] = field(default_factory=list)
    rows_total: int = 0
    rows_read: int = 0
    memberships_written: int = 0
    skipped_stale: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_users: int = 0
    duration_s: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("loaded", "already_loaded", "nothing_to_do")

    def as_dict(self) -> dict[str, Any]:
        d = max(self.duration_s, 1e-9)
        return {
            "snapshot_id": self.snapshot_id,
            "snapshot_time": self.snapshot_time,
            "status": self.status,
            "parts": self.parts,
            "parts_already_done": self.parts_skipped_done,
            "rows_total": self.rows_total,
            "rows_read": self.rows_read,
            "memberships_written": self.memberships_written,
            "skipped_stale": self.skipped_stale,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "failed_users": self.failed_users,
            "duration_s": round(self.duration_s, 3),
            "rows_per_s": round(self.rows_read / d),
            "memberships_per_s": round(self.memberships_written / d),
            "message": self.message,
        }


# --- progress --------------------------------------------------------------------------------------
class Progress:
    """A progress bar on a terminal (rows/s, ETA), structured ``snapshot_progress`` logs otherwise."""

    def __init__(
        self, total: int, *, stream: TextIO | None = None, tty: bool | None = None,
        log_interval_s: float = 5.0,
    ) -> None:  # fmt: skip
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_interval_s = log_interval_s
        self.start = time.monotonic()
        self._last = 0.0
        self.done = 0

    def update(self, done: int, *, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        interval = 0.2 if self.tty else self.log_interval_s
        if not force and now - self._last < interval:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        if self.tty:
            width = 30
            filled = int(width * min(done / self.total, 1.0))
            eta_s = f"{eta:,.0f}s" if eta != float("inf") else "?"
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,} rows "
                f"{rate:,.0f} rows/s ETA {eta_s}   "
            )
            self.stream.flush()
        else:
            log.info(
                "snapshot_progress",
                rows_done=done,
                rows_total=self.total,
                rows_per_s=round(rate),
                eta_s=round(eta, 1) if eta != float("inf") else None,
            )

    def close(self) -> None:
        self.update(self.done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- loader -------------------------------------------------------------------------------------------
_END: Final = object()


#: Write batches a loader keeps in Redis at once (see SnapshotLoader.load).
WRITE_WINDOW = 2


class SnapshotLoader:
    """Validates a snapshot directory and loads it through :class:`MembershipStore`."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        clock: Clock | None = None,
        batch_rows: int | None = None,
        progress: Callable[[int], Progress] | None = None,
        outage_give_up_s: float = 300.0,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.clock = clock or SystemClock()
        self.layout = MembershipLayout(settings.redis_namespace)
        self.store = MembershipStore(
            redis, self.layout, self.clock, old_fan_min_days=settings.old_fan_min_days
        )
        self.ttls = Ttls.from_seconds(
            settings.membership_ttl_s, settings.tombstone_ttl_s, settings.old_fan_min_days
        )
        self.batch_rows = batch_rows or settings.snapshot_batch_rows
        self._progress_factory = progress
        self.outage_give_up_s = outage_give_up_s

    # --- validation ------------------------------------------------------------------------
    def validate(self, directory: str | Path) -> tuple[Manifest, list[int]]:
        """Everything that can refuse a snapshot before a single write (raises PricingError)."""
        m = read_manifest(directory)
        now = self.clock.now_ms()
        age_ms = now - m.snapshot_time_ms
        max_age_ms = self.settings.snapshot_max_age_s * 1000
        if age_ms > max_age_ms:
            raise FailedPreconditionError(
                f"snapshot cut at {format_rfc3339_ms(m.snapshot_time_ms)} is {age_ms // 1000}s old, "
                f"older than PRICING_SNAPSHOT_MAX_AGE_S={self.settings.snapshot_max_age_s}s: it "
                "could bring back relations whose unfollow tombstones have expired",
                reason="SNAPSHOT_TOO_OLD",
            )
        if m.snapshot_time_ms > now + CLOCK_SKEW_MS:
            raise FailedPreconditionError(
                f"snapshot cut at {format_rfc3339_ms(m.snapshot_time_ms)} is in the future",
                reason="SNAPSHOT_IN_FUTURE",
            )
        counts = [count_rows(m.part_path(name)) for name in m.files]
        if sum(counts) != m.rows:
            detail = ", ".join(f"{n}={c}" for n, c in zip(m.files, counts, strict=True))
            raise InvalidArgumentError.field(
                "manifest.rows",
                f"manifest says {m.rows} rows but the parts hold {sum(counts)} ({detail})",
                "ROW_COUNT_MISMATCH",
            )
        return m, counts

    @staticmethod
    def select_parts(
        files: Sequence[str],
        *,
        parts: Sequence[int] | None = None,
        worker_index: int | None = None,
        workers: int | None = None,
    ) -> list[str]:
        """The parts one process loads: explicit indexes, or every ``workers``-th from ``index``."""
        if parts is not None:
            bad = [p for p in parts if not 0 <= p < len(files)]
            if bad:
                raise InvalidArgumentError.field(
                    "parts", f"indexes {bad} outside 0..{len(files) - 1}", "BAD_PART_INDEX"
                )
            return [files[p] for p in sorted(set(parts))]
        if workers is not None or worker_index is not None:
            n = workers or 1
            i = worker_index or 0
            if n < 1 or not 0 <= i < n:
                raise InvalidArgumentError.field(
                    "worker_index", f"must be in 0..{n - 1}", "BAD_WORKER_INDEX"
                )
            return [f for k, f in enumerate(files) if k % n == i]
        return list(files)

    # --- loading --------------------------------------------------------------------------------
    async def load(
        self,
        directory: str | Path,
        *,
        parts: Sequence[int] | None = None,
        worker_index: int | None = None,
        workers: int | None = None,
        validated: tuple[Manifest, list[int]] | None = None,
    ) -> LoadReport:
        """Validate, then load the selected parts (all by default), resuming from checkpoints.

        ``validated`` is :meth:`validate`'s result for ``directory`` when the caller already
        has it (:mod:`sync_worker.claims` loads part by part without re-counting every part).
        """
        t0 = time.monotonic()
        manifest, counts = validated or self.validate(directory)
        sid = snapshot_id(manifest, counts)
        selected = self.select_parts(
            manifest.files, parts=parts, worker_index=worker_index, workers=workers
        )
        count_of = dict(zip(manifest.files, counts, strict=True))
        ckey = self.layout.snapshot_checkpoint_key(sid)
        report = LoadReport(sid, format_rfc3339_ms(manifest.snapshot_time_ms), parts=selected)
        report.rows_total = sum(count_of[p] for p in selected)
        raw = await self._retrying(lambda: self.redis.hgetall(ckey))
        progress = {p: PartProgress.loads(raw.get(p.encode())) for p in selected}
        todo = [p for p in selected if progress[p].offset < count_of[p]]
        report.parts_skipped_done = [p for p in selected if p not in todo]
        log.info(
            "snapshot_load_started",
            snapshot_id=sid,
            snapshot_time=report.snapshot_time,
            parts=len(selected),
            parts_done=len(report.parts_skipped_done),
            rows=report.rows_total,
        )
        if not todo:
            report.status = "already_loaded" if selected else "nothing_to_do"
            report.message = "every selected part was loaded before; nothing written"
            report.duration_s = time.monotonic() - t0
            return report
        budget = self.settings.snapshot_max_error_rate * report.rows_total
        rejected_before = sum(sum(progress[p].rejected.values()) for p in selected)
        done_rows = sum(min(progress[p].offset, count_of[p]) for p in selected)
        bar = self._progress_factory(report.rows_total) if self._progress_factory else None
        if bar is not None:
            bar.update(done_rows, force=True)
        expire_at_ms = manifest.snapshot_time_ms + (self.settings.snapshot_max_age_s + 3600) * 1000
        q: queue.Queue[object] = queue.Queue(maxsize=3)
        stop = threading.Event()
        parser = RowParser(manifest.snapshot_time_ms, self.ttls, self.settings.max_id_length)

        def produce() -> None:
            try:
                for p in todo:
                    for b in part_batches(
                        manifest.part_path(p), progress[p].offset, self.batch_rows, parser
                    ):
                        while not stop.is_set():
                            try:
                                q.put(b, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                q.put(_END)
            except BaseException as exc:  # handed to the event loop
                q.put(exc)

        reader = threading.Thread(target=produce, name="snapshot-reader", daemon=True)
        reader.start()
        loop = asyncio.get_running_loop()
        # up to WRITE_WINDOW batches in Redis at once: Redis works on one while this process
        # packs the next (one at a time left one of them idle); results are taken, and parts
        # checkpointed, strictly in order, so a checkpoint never runs ahead of a write
        inflight: collections.deque[tuple[Batch, asyncio.Task[ApplyResult]]] = collections.deque()

        async def settle() -> bool:
            """Account for the oldest batch in flight; False once the load must stop."""
            nonlocal done_rows
            item, task = inflight.popleft()
            result = await task
            pp = progress[item.part]
            pp.offset = item.end
            pp.written += result.applied
            pp.stale += result.stale
            pp.rejected.update(item.rejected)
            await self._retrying(
                functools.partial(self._checkpoint, ckey, item.part, pp, expire_at_ms)
            )
            report.rows_read += item.rows
            report.memberships_written += result.applied
            report.skipped_stale += result.stale
            report.rejected.update(item.rejected)
            report.failed_users += len(result.failed_users)
            if result.failed_users:
                log.error(
                    "snapshot_users_not_written",
                    count=len(result.failed_users),
                    sample=dict(list(result.failed_users.items())[:3]),
                )
            done_rows += item.rows
            if bar is not None:
                bar.update(done_rows)
            rejected_now = rejected_before + sum(report.rejected.values())
            if rejected_now > budget:
                report.status = "error_rate_exceeded"
                report.message = (
                    f"{rejected_now} malformed rows of {report.rows_total} exceed "
                    f"PRICING_SNAPSHOT_MAX_ERROR_RATE={self.settings.snapshot_max_error_rate}"
                    f" ({dict(report.rejected)}); load stopped"
                )
                return False
            return True

        try:
            going = True
            while going:
                item = await loop.run_in_executor(None, q.get)
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Batch)
                inflight.append((item, asyncio.create_task(self._apply(item))))
                if len(inflight) >= WRITE_WINDOW:
                    going = await settle()
            while going and inflight:
                going = await settle()
        finally:
            for _, task in inflight:  # stopped or failed: writes still running are abandoned
                task.cancel()
            for _, task in inflight:
                with contextlib.suppress(BaseException):
                    await task
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
            await loop.run_in_executor(None, reader.join)
            if bar is not None:
                bar.close()
        report.duration_s = time.monotonic() - t0
        if report.status == "loaded" and report.failed_users:
            report.status = "write_failures"
            report.message = (
                f"{report.failed_users} buyers could not be written (a key of the wrong type? "
                "see snapshot_users_not_written logs); every other row was loaded"
            )
        return report

    async def _checkpoint(self, key: str, part: str, pp: PartProgress, expire_at_ms: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, part, pp.dumps())
        pipe.pexpireat(key, expire_at_ms)
        await pipe.execute()

    async def _apply(self, batch: Batch) -> ApplyResult:
        result = ApplyResult(stale=batch.stale)
        if batch.args:
            result.add(await self._retrying(lambda: self.store.apply_args(batch.args)))
        return result

    async def _retrying(self, op: Callable[[], Any]) -> Any:
        return await retrying(op, self.outage_give_up_s)


async def retrying(op: Callable[[], Any], give_up_s: float) -> Any:
    """Run ``op``; on a Redis outage retry with backoff, logging once, up to ``give_up_s``
    (then UNAVAILABLE: a load run again resumes from its last checkpoint)."""
    since: float | None = None
    delay = 0.05
    while True:
        try:
            result = await op()
        except OUTAGE_ERRORS as exc:
            now = time.monotonic()
            if since is None:
                since = now
                log.warning("redis_unavailable", error=f"{type(exc).__name__}: {exc}")
            if now - since > give_up_s:
                raise UnavailableError(
                    f"Redis unreachable for {give_up_s:.0f}s; run the load again to resume "
                    "from the last checkpoint",
                    reason="REDIS_UNAVAILABLE",
                ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if since is not None:
            log.info("redis_recovered", outage_ms=round((time.monotonic() - since) * 1000))
        return result
