"""Several snapshot loaders sharing one snapshot: a claim per part in Redis.

``sync-worker load-snapshot DIR --claim`` may run on any number of hosts at once. Each
process validates the snapshot, then repeatedly claims a part nobody holds and that is not
finished (``SET <ns>sync:snapshot:{<snapshot_id>}:claim:<part> <owner> NX PX lease``), loads
it through :class:`~sync_worker.snapshot.SnapshotLoader` (checkpointed as always), and
releases it. A claim is renewed while its part loads; a loader that dies leaves a claim that
lapses after ``lease_ms``, and another loader resumes the part from its checkpoint. A process
returns when every part is finished (by anyone), so a snapshot of ``P`` parts loads in about
``P / N`` part-times on ``N`` loaders (when Redis is not the bottleneck), with no static
assignment: adding a loader needs no other change.

Writes are idempotent (last writer wins by the cut time), so a part loaded twice - a claim lost
to a long pause - costs time, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import socket
import time
from pathlib import Path
from typing import Final

import redis.asyncio as aioredis
import structlog

from sync_worker.snapshot.loader import SnapshotLoader
from sync_worker.snapshot.manifest import snapshot_id
from sync_worker.snapshot.report import LoadReport, PartProgress

log = structlog.get_logger("sync_worker.claims")

#: KEYS[1] = claim, ARGV[1] = owner, ARGV[2] = lease ms: extend the claim if still ours.
RENEW_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
#: KEYS[1] = claim, ARGV[1] = owner: drop the claim if still ours.
RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def claim_key(namespace: str, sid: str, part: str) -> str:
    """Same hash tag as the snapshot's checkpoint hash: one slot per snapshot."""
    return f"{namespace}sync:snapshot:{{{sid}}}:claim:{part}"


async def load_claiming(
    loader: SnapshotLoader,
    directory: str | Path,
    *,
    lease_ms: int = 30_000,
    poll_s: float = 0.5,
    owner: str | None = None,
) -> LoadReport:
    """Load every part this process can claim, until all parts are finished; one report.

    The report covers this process's work (``parts`` = the parts it loaded);
    ``parts_already_done`` lists the parts finished by anyone when it returned.
    """
    t0 = time.monotonic()
    redis: aioredis.Redis = loader.redis
    validated = loader.validate(directory)
    manifest, counts = validated
    sid = snapshot_id(manifest, counts)
    ns = loader.settings.redis_namespace
    ckey = loader.layout.snapshot_checkpoint_key(sid)
    count_of = dict(zip(manifest.files, counts, strict=True))
    me = owner or f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"
    total = LoadReport(sid, "", status="nothing_to_do")
    order = list(range(len(manifest.files)))
    random.shuffle(order)  # loaders starting together try different parts first

    async def finished() -> set[str]:
        raw = await loader._retrying(lambda: redis.hgetall(ckey))
        return {
            p
            for p in manifest.files
            if PartProgress.loads(raw.get(p.encode())).offset >= count_of[p]
        }

    while True:
        done = await finished()
        todo = [manifest.files[i] for i in order if manifest.files[i] not in done]
        if not todo:
            break
        claimed_any = False
        for part in todo:
            key = claim_key(ns, sid, part)
            got = await loader._retrying(
                functools.partial(redis.set, key, me, nx=True, px=lease_ms)
            )
            if not got:
                continue
            claimed_any = True
            log.info("snapshot_part_claimed", part=part, owner=me, snapshot_id=sid)
            renewer = asyncio.create_task(_renew(redis, key, me, lease_ms, part))
            try:
                report = await loader.load(
                    directory, parts=[manifest.files.index(part)], validated=validated
                )
            finally:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await renewer
                with contextlib.suppress(Exception):
                    await redis.eval(RELEASE_LUA, 1, key, me)
            total.merge(report)
            if not report.ok:
                total.duration_s = time.monotonic() - t0
                return total
        if not claimed_any:  # every unfinished part is held by another loader: wait
            await asyncio.sleep(poll_s)
    total.parts_skipped_done = sorted(await finished())
    if total.status == "nothing_to_do" and total.parts_skipped_done:
        total.status = "already_loaded"
    total.duration_s = time.monotonic() - t0
    return total


async def _renew(redis: aioredis.Redis, key: str, me: str, lease_ms: int, part: str) -> None:
    while True:
        await asyncio.sleep(lease_ms / 3000)
        try:
            ok = await redis.eval(RENEW_LUA, 1, key, me, str(lease_ms))
        except Exception as exc:  # a renewal failing is not the load failing: try again
            log.warning("snapshot_claim_renew_failed", part=part, error=repr(exc))
            continue
        if not ok:
            log.warning("snapshot_claim_lost", part=part, owner=me)
            return
