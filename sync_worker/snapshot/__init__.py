"""Offline sync: load a T+1 snapshot of follow relations into crowd membership.

The package, by concern (each module's docstring has the details):

* :mod:`~sync_worker.snapshot.manifest` - the snapshot on disk: ``manifest.json``, part
  formats (CSV, Parquet) and headers, row counts, the snapshot's identity;
* :mod:`~sync_worker.snapshot.rows` - parsing and validating rows into write batches;
* :mod:`~sync_worker.snapshot.reader` - the reader thread that parses ahead of the writes;
* :mod:`~sync_worker.snapshot.loader` - :class:`SnapshotLoader`: validation, the load loop,
  checkpoints, retries through Redis outages;
* :mod:`~sync_worker.snapshot.report` - per-part checkpoints and the :class:`LoadReport`;
* :mod:`~sync_worker.snapshot.progress` - the terminal display;
* :mod:`~sync_worker.snapshot.run` - the entry points ``sync-worker load-snapshot`` runs
  (one process; ``--jobs`` through :mod:`sync_worker.parallel`; ``--claim`` through
  :mod:`sync_worker.claims`).

This module re-exports the public API of the first six.
"""

from sync_worker.snapshot.loader import WRITE_WINDOW, SnapshotLoader
from sync_worker.snapshot.manifest import (
    COLUMNS,
    HEADER,
    LAST_PURCHASE,
    MANIFEST,
    Manifest,
    count_rows,
    part_format,
    read_manifest,
    snapshot_id,
)
from sync_worker.snapshot.progress import Progress
from sync_worker.snapshot.reader import BackgroundReader
from sync_worker.snapshot.report import LoadReport, PartProgress
from sync_worker.snapshot.rows import Batch, RowParser, part_batches

__all__ = [
    "COLUMNS",
    "HEADER",
    "LAST_PURCHASE",
    "MANIFEST",
    "WRITE_WINDOW",
    "BackgroundReader",
    "Batch",
    "LoadReport",
    "Manifest",
    "PartProgress",
    "Progress",
    "RowParser",
    "SnapshotLoader",
    "count_rows",
    "part_batches",
    "part_format",
    "read_manifest",
    "snapshot_id",
]
