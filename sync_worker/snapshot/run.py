"""The loader's entry points, as ``sync-worker load-snapshot`` runs them: :func:`load_one` (one
process: all parts, a selection, or ``--claim``), whose result dict is also what each process
of ``--jobs`` (:mod:`sync_worker.parallel`) sends back, and :func:`merge_results` for those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from pricing_service.config import Settings
from pricing_service.redis_client import make_redis
from sync_worker.claims import load_claiming
from sync_worker.snapshot.loader import SnapshotLoader
from sync_worker.snapshot.progress import Progress
from sync_worker.snapshot.report import LoadReport

log = structlog.get_logger("sync_worker")


def result_of(report: LoadReport) -> dict[str, Any]:
    """The report as ``load-snapshot`` prints it: :meth:`LoadReport.as_dict` plus ``ok``."""
    out = report.as_dict()
    out["ok"] = report.ok
    return out


async def load_one(
    settings: Settings,
    directory: str | Path,
    *,
    parts: list[int] | None = None,
    worker_index: int | None = None,
    workers: int | None = None,
    batch_rows: int | None = None,
    progress: Callable[[int], Progress] | None = None,
    claim: bool = False,
) -> dict[str, Any]:
    """Load with one process and its own Redis client; logs ``snapshot_load_finished``."""
    redis = make_redis(settings, socket_timeout_ms=max(settings.redis_socket_timeout_ms, 10_000))
    try:
        loader = SnapshotLoader(settings, redis, batch_rows=batch_rows, progress=progress)
        if claim:
            report = await load_claiming(loader, directory)
        else:
            report = await loader.load(
                directory, parts=parts, worker_index=worker_index, workers=workers
            )
    finally:
        await redis.aclose()
    out = result_of(report)
    log.info("snapshot_load_finished", **out)
    return out


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result for the processes of ``--jobs`` (each loaded other parts, side by side):
    their reports merged (:meth:`LoadReport.merge`), every distinct status listed."""
    total = LoadReport.from_dict(results[0])
    for r in results[1:]:
        total.merge(LoadReport.from_dict(r))
    d = total.as_dict()
    statuses = sorted({r["status"] for r in results})
    return {
        "snapshot_id": d["snapshot_id"],
        "snapshot_time": d["snapshot_time"],
        "status": ",".join(statuses),
        "ok": all(r["ok"] for r in results),
        "jobs": len(results),
        **{k: d[k] for k in ("rows_total", "rows_read", "memberships_written", "skipped_stale")},
        "rejected": d["rejected"],
        "rejected_total": d["rejected_total"],
        "duration_s": d["duration_s"],
        "rows_per_s": d["rows_per_s"],
        "memberships_per_s": d["memberships_per_s"],
        "message": d["message"],
    }
