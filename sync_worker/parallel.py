"""Loading one snapshot with several processes (``sync-worker load-snapshot --jobs N``).

Process ``i`` of ``N`` loads parts ``i, i+N, ...``; each checkpoints its own parts in the
snapshot's checkpoint hash, so a killed job resumes on the next run like a single process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path
from typing import Any

from pricing_service.config import Settings
from pricing_service.errors import PricingError
from pricing_service.logging import configure_logging
from sync_worker.snapshot.run import load_one


def _child(
    settings: Settings, directory: str, index: int, jobs: int, batch_rows: int | None
) -> Any:
    configure_logging(settings.log_level, settings.log_format)
    try:
        return asyncio.run(
            load_one(settings, directory, worker_index=index, workers=jobs, batch_rows=batch_rows)
        )
    except PricingError as exc:  # exceptions lose their reason when pickled
        return {"refused": True, "reason": exc.reason, "message": exc.message}


def load_parallel(
    settings: Settings, directory: str | Path, jobs: int, *, batch_rows: int | None = None
) -> list[dict[str, Any]]:
    """Run ``jobs`` loader processes over disjoint parts; returns their reports.

    A refusal (bad manifest, stale snapshot) is raised by the first process to find it.
    """
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        pending = [
            pool.apply_async(_child, (settings, str(directory), i, jobs, batch_rows))
            for i in range(jobs)
        ]
        reports = [p.get() for p in pending]
    for r in reports:
        if r.get("refused"):
            raise PricingError(r["message"], reason=r["reason"])
    return reports
