"""The terminal display of a load: a progress bar on a terminal, ``snapshot_progress`` logs
otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import structlog

log = structlog.get_logger("sync_worker.snapshot")


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
