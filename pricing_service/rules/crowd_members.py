"""Adding buyers to and removing them from a list crowd: one flow for the admin API and the CLI.

The ids are checked first (nothing is written for a batch with any bad or repeated id); then
every change is written to Redis with the version of the call (the newest add or remove of a
buyer wins, whatever the arrival order), then the batch is recorded in the crowds' audit trail.
A Redis failure leaves no audit entry and is reported as UNAVAILABLE: the caller retries (the
changes are idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from pricing_service.crowds import CrowdDef
from pricing_service.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    UnavailableError,
)
from pricing_service.ids import require_id
from pricing_service.membership.derive import Ttls, list_change
from pricing_service.membership.writer import MembershipWriter

#: Violations listed in one refusal, at most.
MAX_VIOLATIONS = 100


class CrowdRecords(Protocol):
    async def get_crowd(self, seller_id: str, crowd_id: str) -> CrowdDef: ...

    async def record_member_change(
        self, seller_id: str, crowd_id: str, added: int, removed: int, actor: str
    ) -> int: ...


@dataclass(frozen=True, slots=True)
class MemberChange:
    crowd: CrowdDef
    added: int
    removed: int
    version_ms: int
    revision: int


def member_changes(
    add: list[str], remove: list[str], *, max_batch: int, max_id_length: int
) -> list[tuple[str, bool]]:
    """(user, removed) of a batch, every id checked; refuses an empty, oversize or repeating
    batch with every problem named (``add_user_ids[3]``)."""
    n = len(add) + len(remove)
    if n == 0:
        raise InvalidArgumentError.field(
            "add_user_ids", "give buyers to add or to remove", "EMPTY_BATCH"
        )
    if n > max_batch:
        raise InvalidArgumentError.field(
            "add_user_ids",
            f"{n} buyers exceed the limit of {max_batch} per call; load a list file with "
            "`sync-worker load-list` for bigger changes",
            "BATCH_TOO_LARGE",
        )
    seen: dict[str, str] = {}
    problems: list[FieldViolation] = []
    out: list[tuple[str, bool]] = []
    for name, ids, removed in (("add_user_ids", add, False), ("remove_user_ids", remove, True)):
        for i, user in enumerate(ids):
            field = f"{name}[{i}]"
            try:
                require_id(user, field, max_id_length)
            except InvalidArgumentError as exc:
                problems.extend(exc.violations)
                continue
            if user in seen:
                problems.append(
                    FieldViolation(field, f"repeats {seen[user]} ({user!r})", "DUPLICATE_USER")
                )
                continue
            seen[user] = field
            out.append((user, removed))
    if problems:
        first = problems[0]
        raise InvalidArgumentError(
            f"{first.field}: {first.description}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            reason=first.reason,
            violations=problems[:MAX_VIOLATIONS],
            metadata={"field": first.field},
        )
    return out


async def publish_list(
    membership: MembershipWriter, crowd: CrowdDef, *, listed: bool
) -> RedisError | OSError | None:
    """Register (``listed``) or unregister a list crowd in Redis's list registry, for the list
    file loader, after the rule store committed it: best effort, since the crowd index of a
    running server publishes it too (retrying). Returns the failure, for the caller to report
    its own way, or ``None``."""
    try:
        if listed:
            await membership.register_lists([crowd])
        else:
            await membership.unregister_lists([crowd])
    except (RedisError, OSError) as exc:
        return exc
    return None


async def update_members(
    records: CrowdRecords,
    membership: MembershipWriter,
    ttls: Ttls,
    seller_id: str,
    crowd_id: str,
    changes: list[tuple[str, bool]],
    actor: str,
) -> MemberChange:
    """Write checked changes (:func:`member_changes`) to a list crowd, then audit them."""
    crowd = await records.get_crowd(seller_id, crowd_id)
    if not crowd.is_list:
        raise FailedPreconditionError(
            f"crowd_id: {crowd.name} is a predicate crowd; only list crowds have members",
            reason="NOT_A_LIST_CROWD",
            violations=[FieldViolation("crowd_id", "is a predicate crowd", "NOT_A_LIST_CROWD")],
        )
    version = membership.clock.now_ms()
    writes = [list_change(u, crowd.list_handle, version, removed=r, ttls=ttls) for u, r in changes]
    try:
        result = await membership.apply(writes)
    except (RedisError, OSError) as exc:
        raise UnavailableError(
            f"Redis is unavailable ({type(exc).__name__}); no change is confirmed: retry the "
            "call (list changes are idempotent)",
            reason="REDIS_UNAVAILABLE",
        ) from None
    if result.failed_users:
        user, error = next(iter(result.failed_users.items()))
        raise FailedPreconditionError(
            f"{len(result.failed_users)} buyers' membership keys could not be written (e.g. "
            f"{user!r}: {error}); the other changes were applied",
            reason="MEMBERSHIP_WRITE_FAILED",
        )
    added = sum(1 for _, r in changes if not r)
    removed = len(changes) - added
    revision = await records.record_member_change(seller_id, crowd_id, added, removed, actor)
    return MemberChange(crowd, added, removed, version, revision)
