"""List crowds from files, and the one-off migration of membership to the fact layout.

``sync-worker load-list --seller S --crowd C FILE [--at TIME]`` loads a large list change (up
to millions of buyers) into the list crowd ``sellers/S/crowds/C``. The file is CSV with a
header: ``user_id`` (every row adds the buyer) or ``user_id,action`` (``add`` or ``remove``).
Every row of a file is one change with the same version, ``--at`` (the time of the list, RFC
3339; default: now): the newest add or remove of a buyer wins whatever the arrival order, so
an API change made after ``--at`` is never undone by a late file, and a file loaded twice
changes nothing.

The crowd is found in the registry the pricing service keeps in Redis (a list crowd is
registered when it is created). Before anything is written the whole file is checked: the
header, every id (the server's rules), every action, no buyer twice; a file with any problem is
refused with the first problems and their line numbers, and nothing is written. A file older
than ``PRICING_SNAPSHOT_MAX_AGE_S`` is refused (its adds could bring back buyers whose removals
have expired). Progress is checkpointed in Redis after each batch: a load killed at any moment
resumes where it stopped when run again with the same file and ``--at``.

``sync-worker migrate-membership`` converts every buyer hash of the layout before issue 14
(one record per crowd) into facts, then sets the migration marker, after which readers stop
asking for the old fields. Run it once every sync worker runs this version; until then, and
without it, readers accept both layouts and every write converts the buyer it touches.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis
import structlog

from pricing_service.config import Settings
from pricing_service.domain import Clock, SystemClock
from pricing_service.errors import FailedPreconditionError, FieldViolation, InvalidArgumentError
from pricing_service.ids import id_problem
from pricing_service.membership.layout import LAYOUT_VERSION, MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.membership.writer import ApplyResult
from pricing_service.redis_errors import retrying
from sync_worker.common import CLOCK_SKEW_MS, RESUME_HINT, format_rfc3339_ms

log = structlog.get_logger("sync_worker.lists")

MAX_REPORTED: Final = 20
ACTIONS: Final = {"add": False, "remove": True}


@dataclass(slots=True)
class ListFile:
    """A checked list file."""

    path: Path
    with_action: bool
    rows: int
    adds: int
    removes: int
    sha256: str


def _rows(path: Path) -> tuple[Iterator[list[str]], bool]:
    f = path.open(newline="", encoding="utf-8")
    reader = csv.reader(f)
    header = [h.strip().lstrip("\ufeff") for h in next(reader, None) or []]
    if header not in (["user_id"], ["user_id", "action"]):
        f.close()
        raise InvalidArgumentError.field(
            "header", f"must be 'user_id' or 'user_id,action', got {','.join(header)!r}",
            "BAD_HEADER",
        )  # fmt: skip

    def rows() -> Iterator[list[str]]:
        with f:
            yield from reader

    return rows(), len(header) == 2


def check_list_file(path: str | Path, max_id_length: int) -> ListFile:
    """Every row of the file, checked (raises InvalidArgumentError naming the first problems)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError.field("file", f"{p} is not a file", "MISSING_FILE")
    digest = hashlib.sha256()
    with p.open("rb") as raw:
        while chunk := raw.read(1 << 20):
            digest.update(chunk)
    try:
        rows, with_action = _rows(p)
        seen: dict[str, int] = {}
        problems: list[FieldViolation] = []
        n = adds = removes = 0
        for line, rec in enumerate(rows, start=2):
            if not rec:
                continue  # a blank line
            n += 1
            if len(rec) != (2 if with_action else 1):
                problems.append(
                    FieldViolation(f"line {line}", f"has {len(rec)} cells", "WRONG_COLUMN_COUNT")
                )
                continue
            user = rec[0]
            problem = id_problem(user, max_id_length)
            if problem is not None:
                problems.append(FieldViolation(f"line {line}", f"user_id {user[:40]!r}", problem))
                continue
            removed = False
            if with_action:
                act = ACTIONS.get(rec[1].strip().lower())
                if act is None:
                    problems.append(
                        FieldViolation(
                            f"line {line}",
                            f"action {rec[1][:20]!r} is not add or remove",
                            "BAD_ACTION",
                        )
                    )
                    continue
                removed = act
            first = seen.get(user)
            if first is not None:
                problems.append(
                    FieldViolation(
                        f"line {line}", f"repeats line {first} ({user!r})", "DUPLICATE_USER"
                    )
                )
                continue
            seen[user] = line
            if removed:
                removes += 1
            else:
                adds += 1
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError.field("file", f"not UTF-8: {exc}", "NOT_UTF8") from None
    if problems:
        first_p = problems[0]
        raise InvalidArgumentError(
            f"{len(problems)} problem(s), nothing written; first: {first_p.field}: "
            f"{first_p.reason}: {first_p.description}",
            reason=first_p.reason,
            violations=problems[:MAX_REPORTED],
        )
    if n == 0:
        raise InvalidArgumentError.field("file", "holds no buyer", "EMPTY_LIST")
    return ListFile(p, with_action, n, adds, removes, digest.hexdigest())


@dataclass(slots=True)
class ListLoadReport:
    crowd: str
    handle: int
    file: str
    list_time: str
    status: str = "loaded"  # loaded | already_loaded | write_failures
    rows: int = 0
    added: int = 0
    removed: int = 0
    written: int = 0
    stale: int = 0
    failed_users: int = 0
    duration_s: float = 0.0
    message: str = ""
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("loaded", "already_loaded")

    def as_dict(self) -> dict[str, Any]:
        return {
            "crowd": self.crowd,
            "list_handle": self.handle,
            "file": self.file,
            "list_time": self.list_time,
            "status": self.status,
            "ok": self.ok,
            "rows": self.rows,
            "added": self.added,
            "removed": self.removed,
            "written": self.written,
            "stale": self.stale,
            "failed_users": self.failed_users,
            "duration_s": round(self.duration_s, 3),
            "rows_per_s": round(self.rows / max(self.duration_s, 1e-9)),
            "message": self.message,
        }


class ListLoader:
    """Loads list files into a list crowd (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        clock: Clock | None = None,
        batch_rows: int | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.clock = clock or SystemClock()
        self.layout = MembershipLayout(settings.redis_namespace)
        self.store = MembershipStore(
            redis, self.layout, self.clock, old_fan_min_days=settings.old_fan_min_days
        )
        self.batch_rows = batch_rows or settings.snapshot_batch_rows

    async def load(
        self, seller_id: str, crowd_id: str, path: str | Path, *, at_ms: int | None = None
    ) -> ListLoadReport:
        t0 = time.monotonic()
        now = self.clock.now_ms()
        version = now if at_ms is None else at_ms
        max_age_ms = self.settings.snapshot_max_age_s * 1000
        if version < now - max_age_ms:
            raise FailedPreconditionError(
                f"--at {format_rfc3339_ms(version)} is older than PRICING_SNAPSHOT_MAX_AGE_S="
                f"{self.settings.snapshot_max_age_s}s: its adds could bring back buyers whose "
                "removals have expired",
                reason="LIST_TOO_OLD",
            )
        if version > now + CLOCK_SKEW_MS:
            raise FailedPreconditionError(
                f"--at {format_rfc3339_ms(version)} is in the future", reason="LIST_IN_FUTURE"
            )
        checked = check_list_file(path, self.settings.max_id_length)
        name = self.layout.crowd_list_name(seller_id, crowd_id)
        handle = await self.store.list_handle(seller_id, crowd_id)
        if handle is None:
            raise FailedPreconditionError(
                f"no list crowd {name} is registered in Redis: create it with "
                "`pricing-service crowds create --seller S --id C --list` (a running server "
                "registers it), or check PRICING_REDIS_NAMESPACE",
                reason="CROWD_NOT_FOUND",
            )
        report = ListLoadReport(name, handle, str(checked.path), format_rfc3339_ms(version))
        report.rows = checked.rows
        report.added, report.removed = checked.adds, checked.removes
        load_id = hashlib.sha256(
            json.dumps([handle, version, checked.sha256]).encode()
        ).hexdigest()[:20]
        ckey = self.layout.list_checkpoint_key(load_id)
        done = int(await self._retrying(lambda: self.redis.hget(ckey, "offset")) or 0)
        if done >= checked.rows:
            report.status = "already_loaded"
            report.message = "this file was loaded with this --at before; nothing written"
            report.duration_s = time.monotonic() - t0
            return report
        field_ = self.layout.list_field(handle)
        add_v = self.layout.encode_list(version, removed=False)
        rem_v = self.layout.encode_list(version, removed=True, ttl_s=self.settings.tombstone_ttl_s)
        log.info("list_load_started", crowd=name, handle=handle, rows=checked.rows, resume_at=done)
        rows, with_action = _rows(checked.path)
        by_user: dict[str, list[str | bytes]] = {}
        pos = 0
        result = ApplyResult()
        for rec in rows:
            if not rec:
                continue
            pos += 1
            if pos <= done:
                continue
            removed = with_action and ACTIONS[rec[1].strip().lower()]
            by_user[rec[0]] = [field_, rem_v if removed else add_v]
            if len(by_user) >= self.batch_rows:
                result.add(await self._write(by_user, ckey, pos))
                by_user = {}
        if by_user:
            result.add(await self._write(by_user, ckey, pos))
        report.written, report.stale = result.applied, result.stale
        report.failed_users = len(result.failed_users)
        if result.failed_users:
            report.status = "write_failures"
            report.message = (
                f"{len(result.failed_users)} buyers could not be written (a key of the wrong "
                f"type?), e.g. {next(iter(result.failed_users))!r}; every other row was loaded"
            )
        report.duration_s = time.monotonic() - t0
        return report

    async def _write(
        self, by_user: dict[str, list[str | bytes]], ckey: str, offset: int
    ) -> ApplyResult:
        result: ApplyResult = await self._retrying(lambda: self.store.apply_args(by_user))

        async def checkpoint() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(ckey, "offset", str(offset))
            pipe.pexpire(ckey, (self.settings.snapshot_max_age_s + 3600) * 1000)
            await pipe.execute()

        await self._retrying(checkpoint)
        return result

    async def _retrying(self, op: Callable[[], Any]) -> Any:
        return await retrying(op, 300.0, resume_hint=RESUME_HINT)


async def migrate_membership(
    settings: Settings, redis: aioredis.Redis, *, batch: int = 500
) -> dict[str, Any]:
    """Convert every buyer hash to facts (legacy fields, expired fields), then set the marker."""
    t0 = time.monotonic()
    layout = MembershipLayout(settings.redis_namespace)
    store = MembershipStore(
        redis, layout, SystemClock(), old_fan_min_days=settings.old_fan_min_days
    )
    keys = converted = failed = 0
    users: dict[str, list[str | bytes]] = {}
    async for key in redis.scan_iter(match=layout.user_key_pattern(), count=1000):
        k = key.decode() if isinstance(key, bytes) else str(key)
        try:
            users[layout.user_from_key(k)] = []
        except ValueError:
            continue
        if len(users) >= batch:
            r = await store.apply_args(users)
            keys, converted, failed = (
                keys + len(users),
                converted + r.converted,
                failed + len(r.failed_users),
            )
            users = {}
    if users:
        r = await store.apply_args(users)
        keys, converted, failed = (
            keys + len(users),
            converted + r.converted,
            failed + len(r.failed_users),
        )
    if failed == 0:
        await redis.set(layout.layout_version_key, LAYOUT_VERSION)
    out = {
        "buyer_keys": keys,
        "relations_converted": converted,
        "failed_keys": failed,
        "marker_set": failed == 0,
        "duration_s": round(time.monotonic() - t0, 3),
    }
    log.info("membership_migrated", **out)
    return out
