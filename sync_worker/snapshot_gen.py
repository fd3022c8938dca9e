"""Writing snapshot directories (demos, tests, benchmarks) and generating realistic rows.

``write_snapshot(dir, rows, snapshot_time_ms)`` writes ``manifest.json`` and CSV (or Parquet)
parts of ``part_rows`` rows each, in the format :mod:`sync_worker.snapshot` loads.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sync_worker.common import format_rfc3339_ms
from sync_worker.snapshot import COLUMNS, MANIFEST

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """One follow relation at the snapshot cut."""

    user_id: str
    seller_id: str
    followed_at_ms: int
    purchase_count: int = 0


def write_snapshot(
    directory: str | Path,
    rows: Iterable[SnapshotRow],
    snapshot_time_ms: int,
    *,
    part_rows: int = 250_000,
    fmt: Literal["csv", "parquet"] = "csv",
    prefix: str = "part",
) -> Path:
    """Write a snapshot directory (created if needed); returns the manifest's path.

    Rows are streamed into parts of at most ``part_rows`` rows (memory stays flat for CSV;
    Parquet buffers one part).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    total = 0
    it = iter(rows)
    while True:
        chunk = _take(it, part_rows)
        first = next(chunk, None)
        if first is None:
            break
        name = f"{prefix}-{len(files):05d}.{fmt}"
        n = _write_part(d / name, _prepend(first, chunk), fmt)
        files.append(name)
        total += n
    if not files:  # an empty snapshot still has one (empty) part
        name = f"{prefix}-00000.{fmt}"
        _write_part(d / name, iter(()), fmt)
        files.append(name)
    manifest = d / MANIFEST
    manifest.write_text(
        json.dumps(
            {"snapshot_time": format_rfc3339_ms(snapshot_time_ms), "files": files, "rows": total},
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return manifest


def _take(it: Iterator[SnapshotRow], n: int) -> Iterator[SnapshotRow]:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def _prepend(first: SnapshotRow, rest: Iterator[SnapshotRow]) -> Iterator[SnapshotRow]:
    yield first
    yield from rest


def _write_part(path: Path, rows: Iterator[SnapshotRow], fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        cols: dict[str, list[object]] = {c: [] for c in COLUMNS}
        for r in rows:
            cols["user_id"].append(r.user_id)
            cols["seller_id"].append(r.seller_id)
            cols["followed_at"].append(r.followed_at_ms)
            cols["purchase_count"].append(r.purchase_count)
        table = pa.table(
            {
                "user_id": pa.array(cols["user_id"], pa.string()),
                "seller_id": pa.array(cols["seller_id"], pa.string()),
                "followed_at": pa.array(cols["followed_at"], pa.timestamp("ms", tz="UTC")),
                "purchase_count": pa.array(cols["purchase_count"], pa.int64()),
            }
        )
        pq.write_table(table, path, row_group_size=64 * 1024)
        return int(table.num_rows)
    n = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(
                (r.user_id, r.seller_id, format_rfc3339_ms(r.followed_at_ms), r.purchase_count)
            )
            n += 1
    return n


def realistic_rows(
    n_rows: int,
    snapshot_time_ms: int,
    *,
    seed: int = 7,
    sellers: int = 200_000,
    user_prefix: str = "u",
) -> Iterator[SnapshotRow]:
    """About ``n_rows`` follow relations, grouped by buyer, shaped like a real follow graph.

    Most buyers follow a few sellers (1-8), about 9% follow 10-60, about 1% follow 100-500;
    popular sellers are followed far more often (Pareto); follow dates spread over two years;
    about 30% of relations have purchases. Deterministic for a seed.
    """
    rng = random.Random(seed)
    emitted = 0
    user = 0
    while emitted < n_rows:
        user += 1
        p = rng.random()
        if p < 0.90:
            k = rng.randint(1, 8)
        elif p < 0.99:
            k = rng.randint(10, 60)
        else:
            k = rng.randint(100, 500)
        k = min(k, n_rows - emitted, sellers)
        chosen: set[int] = set()
        while len(chosen) < k:
            if rng.random() < 0.7:  # popular sellers
                chosen.add(int(rng.paretovariate(1.2) * 7) % sellers + 1)
            else:
                chosen.add(rng.randrange(sellers) + 1)
        uid = f"{user_prefix}{user}"
        for s in sorted(chosen):
            followed = snapshot_time_ms - rng.randrange(1, 730) * DAY_MS - rng.randrange(DAY_MS)
            bought = rng.randint(1, 20) if rng.random() < 0.3 else 0
            yield SnapshotRow(uid, str(s), followed, bought)
        emitted += k
