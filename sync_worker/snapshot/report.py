"""What a load did: per-part checkpoints (:class:`PartProgress`) and the run's
:class:`LoadReport`, with the one way to add reports up (:meth:`LoadReport.merge`)."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("sync_worker.snapshot")


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

    def merge(self, other: LoadReport) -> None:
        """Count ``other`` in: another run over other parts of the same snapshot, after this
        one (claimed parts) or beside it (``--jobs``). A failed status wins; otherwise the
        total is ``loaded`` once any run loaded something; the duration is the longest run's."""
        self.snapshot_id = self.snapshot_id or other.snapshot_id
        self.snapshot_time = self.snapshot_time or other.snapshot_time
        if not other.ok:
            self.status = other.status
        elif other.status == "loaded" and self.ok:
            self.status = "loaded"
        self.parts.extend(p for p in other.parts if p not in other.parts_skipped_done)
        self.rows_total += other.rows_total
        self.rows_read += other.rows_read
        self.memberships_written += other.memberships_written
        self.skipped_stale += other.skipped_stale
        self.rejected.update(other.rejected)
        self.failed_users += other.failed_users
        self.duration_s = max(self.duration_s, other.duration_s)
        if other.message:
            self.message = "; ".join(m for m in (self.message, other.message) if m)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadReport:
        """The report :meth:`as_dict` described (e.g. sent back by a loader process)."""
        return cls(
            d["snapshot_id"],
            d["snapshot_time"],
            status=d["status"],
            parts=list(d["parts"]),
            parts_skipped_done=list(d["parts_already_done"]),
            rows_total=d["rows_total"],
            rows_read=d["rows_read"],
            memberships_written=d["memberships_written"],
            skipped_stale=d["skipped_stale"],
            rejected=collections.Counter(d["rejected"]),
            failed_users=d["failed_users"],
            duration_s=d["duration_s"],
            message=d["message"],
        )

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
