"""The snapshot loader: validate a snapshot, then load its parts through the membership store,
checkpointed per part.

Before anything is written the whole snapshot is validated: the manifest, every part's format
and header, and a counting pass over every part whose total must equal ``rows`` (Parquet:
footer metadata). A snapshot whose cut is older than ``snapshot_max_age_s`` (it could resurrect
relations whose unfollow tombstones have expired) or in the future is refused.

Writes merge order-independently, so loading a snapshot again, or after a crash, changes
nothing. Progress is checkpointed per part in the hash
``MembershipLayout.snapshot_checkpoint_key(snapshot_id)`` (field = part file name, value = JSON
``{"offset": rows done, "written", "stale", "rejected": {reason: n}}``), written after each
batch's writes succeeded: a load killed at any moment resumes from the last checkpoint and
replays at most one batch, harmlessly. Parts can be split between processes (``parts=``); each
part must be loaded by one process at a time.

As soon as the rows rejected exceed ``snapshot_max_error_rate`` of the rows to load, the load
stops: the final rate could only be higher. A Redis outage is ridden out under the one retry
policy (:func:`pricing_service.redis_errors.retrying`) for up to ``outage_give_up_s``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import redis.asyncio as aioredis
import structlog

from pricing_service.config import Settings
from pricing_service.domain import Clock, SystemClock
from pricing_service.errors import FailedPreconditionError, InvalidArgumentError
from pricing_service.membership.derive import Ttls
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.membership.writer import ApplyResult
from pricing_service.redis_errors import retrying
from sync_worker.common import CLOCK_SKEW_MS, RESUME_HINT, format_rfc3339_ms
from sync_worker.snapshot.manifest import Manifest, count_rows, read_manifest, snapshot_id
from sync_worker.snapshot.progress import Progress
from sync_worker.snapshot.reader import BackgroundReader
from sync_worker.snapshot.report import LoadReport, PartProgress
from sync_worker.snapshot.rows import Batch, RowParser, part_batches

log = structlog.get_logger("sync_worker.snapshot")

T = TypeVar("T")

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
        parser = RowParser(manifest.snapshot_time_ms, self.ttls, self.settings.max_id_length)
        batches = (
            b
            for p in todo
            for b in part_batches(
                manifest.part_path(p), progress[p].offset, self.batch_rows, parser
            )
        )
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
            async with BackgroundReader(batches) as reader:
                try:
                    going = True
                    while going:
                        item = await reader.next()
                        if item is None:
                            break
                        inflight.append((item, asyncio.create_task(self._apply(item))))
                        if len(inflight) >= WRITE_WINDOW:
                            going = await settle()
                    while going and inflight:
                        going = await settle()
                finally:
                    # stopped or failed: writes still running are abandoned
                    for _, task in inflight:
                        task.cancel()
                    for _, task in inflight:
                        with contextlib.suppress(BaseException):
                            await task
        finally:
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

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        return await retrying(op, self.outage_give_up_s, resume_hint=RESUME_HINT)
