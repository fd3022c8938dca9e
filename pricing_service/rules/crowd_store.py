"""Seller-defined crowds in the rule store: definitions, list handles, change feed, audit trail.

The crowd half of the SQL implementation, on :class:`~pricing_service.rules.sql.SqlBase`;
:class:`~pricing_service.rules.sql_store.SqlRuleStore` adds the rule half, so both backends
share it.

Crowd writes lock the store's revision row first, like rule writes: a rule that names a crowd
and the deletion of that crowd are serialised, so a crowd is never deleted while a rule targets
it. Crowds have their own revision counter (``crowd_meta``) and change feed
(``crowd_changes``, also the audit trail), so the rule index's feed stays gapless. List crowds
get a list handle from ``crowd_meta.next_list_handle``: never reused, so a crowd created again
under a deleted crowd's id never sees the old crowd's list.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from pricing_service.crowds import CrowdDef, Predicate
from pricing_service.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
)
from pricing_service.rules.sql import Row, SqlBase, Tx
from pricing_service.rules.store import CREATE, DELETE, MEMBERS, CrowdChange
from pricing_service.rules.tokens import decode_token, encode_token, malformed_token

CROWD_COLUMNS: Final = (
    "seller_id, crowd_id, display_name, form, min_follow_days, max_follow_days, min_purchases,"
    " purchased_within_days, list_handle, revision, create_ms, update_ms"
)
CROWD_CHANGE_COLUMNS: Final = (
    "revision, action, seller_id, crowd_id, display_name, form, min_follow_days,"
    " max_follow_days, min_purchases, purchased_within_days, list_handle, crowd_revision,"
    " create_ms, update_ms, added, removed, actor, change_ms"
)


def crowd_from_row(r: Row) -> CrowdDef:
    predicate = None
    if r[3] == "PREDICATE":
        predicate = Predicate(
            min_follow_days=int(r[4] or 0),
            max_follow_days=None if r[5] is None else int(r[5]),
            min_purchases=int(r[6] or 0),
            purchased_within_days=None if r[7] is None else int(r[7]),
        )
    return CrowdDef(
        seller_id=r[0],
        crowd_id=r[1],
        predicate=predicate,
        list_handle=int(r[8] or 0),
        display_name=r[2],
        revision=int(r[9]),
        create_ms=int(r[10]),
        update_ms=int(r[11]),
    )


def _definition(c: CrowdDef) -> tuple[object, ...]:
    p = c.predicate
    if p is None:
        return (c.display_name, "LIST", None, None, None, None, c.list_handle)
    return (
        c.display_name,
        "PREDICATE",
        p.min_follow_days,
        p.max_follow_days,
        p.min_purchases,
        p.purchased_within_days,
        None,
    )


def change_from_row(r: Row) -> CrowdChange:
    crowd = crowd_from_row(
        (r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13])
    )
    return CrowdChange(
        revision=int(r[0]),
        action=r[1],
        crowd=crowd,
        actor=r[16],
        change_ms=int(r[17]),
        added=int(r[14]),
        removed=int(r[15]),
    )


def _no_crowd(seller_id: str, crowd_id: str) -> NotFoundError:
    return NotFoundError.field(
        "crowd_id", f"seller {seller_id!r} has no crowd {crowd_id!r}", "CROWD_NOT_FOUND"
    )


class CrowdStore(SqlBase):
    """The crowd half of the SQL rule store (see the module docstring)."""

    # --- writes ---------------------------------------------------------------------------
    async def _next_crowd_revision(self, tx: Tx) -> tuple[int, int]:
        await self._lock_revision(tx)  # serialises with rule writes (module docstring)
        row = await tx.fetchone("SELECT revision, next_list_handle FROM crowd_meta WHERE id = 1")
        assert row is not None, "migration 2 inserts the crowd_meta row"
        return int(row[0]) + 1, int(row[1])

    async def _record_crowd(
        self,
        tx: Tx,
        revision: int,
        action: str,
        crowd: CrowdDef,
        actor: str,
        added: int = 0,
        removed: int = 0,
    ) -> None:
        await tx.execute(
            f"INSERT INTO crowd_changes ({CROWD_CHANGE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                revision,
                action,
                crowd.seller_id,
                crowd.crowd_id,
                *_definition(crowd),
                crowd.revision,
                crowd.create_ms,
                crowd.update_ms,
                added,
                removed,
                actor,
                self.clock.now_ms(),
            ),
        )
        await tx.execute("UPDATE crowd_meta SET revision = ? WHERE id = 1", (revision,))

    async def create_crowd(self, crowd: CrowdDef, actor: str) -> CrowdDef:
        """Create ``sellers/{seller}/crowds/{crowd_id}`` (a list crowd gets its list handle)."""
        async with self._write() as tx:
            revision, handle = await self._next_crowd_revision(tx)
            if await tx.fetchone(
                "SELECT 1 FROM crowds WHERE seller_id = ? AND crowd_id = ?",
                (crowd.seller_id, crowd.crowd_id),
            ):
                raise AlreadyExistsError.field(
                    "crowd.crowd_id",
                    f"seller {crowd.seller_id!r} already has a crowd {crowd.crowd_id!r}",
                    "CROWD_EXISTS",
                )
            row = await tx.fetchone(
                "SELECT COUNT(*) FROM crowds WHERE seller_id = ?", (crowd.seller_id,)
            )
            count = int(row[0]) if row else 0
            if count >= self.max_crowds_per_seller:
                raise FailedPreconditionError.field(
                    "crowd.seller_id",
                    f"seller {crowd.seller_id!r} has {count} crowds, the limit is "
                    f"{self.max_crowds_per_seller}",
                    "TOO_MANY_CROWDS",
                )
            now = self.clock.now_ms()
            written = replace(
                crowd,
                list_handle=handle if crowd.predicate is None else 0,
                revision=revision,
                create_ms=now,
                update_ms=now,
            )
            await tx.execute(
                f"INSERT INTO crowds ({CROWD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    written.seller_id,
                    written.crowd_id,
                    *_definition(written),
                    revision,
                    now,
                    now,
                ),
            )
            if crowd.predicate is None:
                await tx.execute(
                    "UPDATE crowd_meta SET next_list_handle = ? WHERE id = 1", (handle + 1,)
                )
            await self._record_crowd(tx, revision, CREATE, written, actor)
        return written

    async def _locked_crowd(self, tx: Tx, seller_id: str, crowd_id: str) -> CrowdDef:
        row = await tx.fetchone(
            f"SELECT {CROWD_COLUMNS} FROM crowds WHERE seller_id = ? AND crowd_id = ?",
            (seller_id, crowd_id),
        )
        if row is None:
            raise _no_crowd(seller_id, crowd_id)
        return crowd_from_row(row)

    async def delete_crowd(self, seller_id: str, crowd_id: str, actor: str) -> int:
        """Delete a crowd no rule targets; return the revision of the deletion."""
        async with self._write() as tx:
            revision, _ = await self._next_crowd_revision(tx)
            crowd = await self._locked_crowd(tx, seller_id, crowd_id)
            users = await tx.fetchall(
                "SELECT rule_id FROM rules WHERE seller_id = ? AND crowd_id = ? LIMIT 3",
                (seller_id, crowd_id),
            )
            if users:
                raise FailedPreconditionError.field(
                    "crowd_id",
                    f"rules target {crowd.name} (e.g. {', '.join(r[0] for r in users)}); delete "
                    "them first",
                    "CROWD_IN_USE",
                )
            await tx.execute(
                "DELETE FROM crowds WHERE seller_id = ? AND crowd_id = ?", (seller_id, crowd_id)
            )
            await self._record_crowd(tx, revision, DELETE, crowd, actor)
        return revision

    async def record_member_change(
        self, seller_id: str, crowd_id: str, added: int, removed: int, actor: str
    ) -> int:
        """Audit a batch of list changes made through the API; return its revision."""
        async with self._write() as tx:
            revision, _ = await self._next_crowd_revision(tx)
            crowd = await self._locked_crowd(tx, seller_id, crowd_id)
            await self._record_crowd(tx, revision, MEMBERS, crowd, actor, added, removed)
        return revision

    # --- reads ----------------------------------------------------------------------------
    async def get_crowd(self, seller_id: str, crowd_id: str) -> CrowdDef:
        [rows] = await self._read_all(
            (
                f"SELECT {CROWD_COLUMNS} FROM crowds WHERE seller_id = ? AND crowd_id = ?",
                (seller_id, crowd_id),
            )
        )
        if not rows:
            raise _no_crowd(seller_id, crowd_id)
        return crowd_from_row(rows[0])

    async def list_crowds(
        self, seller_id: str, page_size: int, page_token: str
    ) -> tuple[list[CrowdDef], str]:
        """A seller's crowds by id; keyset pages."""
        where = "seller_id = ?"
        params: list[object] = [seller_id]
        if page_token:
            pos = decode_token(page_token, "crowds", seller_id)
            if len(pos) != 1 or not isinstance(pos[0], str):
                raise malformed_token()
            where += " AND crowd_id > ?"
            params.append(pos[0])
        params.append(page_size + 1)
        [rows] = await self._read_all(
            (
                f"SELECT {CROWD_COLUMNS} FROM crowds WHERE {where} ORDER BY crowd_id LIMIT ?",
                params,
            )
        )
        crowds = [crowd_from_row(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            token = encode_token([crowds[-1].crowd_id], "crowds", seller_id)
        return crowds, token

    async def crowd_history(
        self, seller_id: str, page_size: int, page_token: str
    ) -> tuple[list[CrowdChange], str]:
        """A seller's crowd changes, newest first."""
        rows, token = await self._history(
            "crowd_changes",
            CROWD_CHANGE_COLUMNS,
            [("seller_id", seller_id)],
            page_size,
            page_token,
            ("crowd-history", seller_id),
        )
        return [change_from_row(r) for r in rows], token

    async def crowd_revision(self) -> int:
        return await self._revision("crowd_meta")

    async def crowd_changes_since(self, revision: int, limit: int) -> list[CrowdChange]:
        rows = await self._feed("crowd_changes", CROWD_CHANGE_COLUMNS, revision, limit)
        return [change_from_row(r) for r in rows]

    async def load_crowds(self) -> tuple[list[CrowdDef], int]:
        """Every crowd and the crowd revision they reflect (one snapshot)."""
        rev, rows = await self._read_all(
            ("SELECT revision FROM crowd_meta WHERE id = 1", ()),
            (f"SELECT {CROWD_COLUMNS} FROM crowds ORDER BY seller_id, crowd_id", ()),
        )
        return [crowd_from_row(r) for r in rows], int(rev[0][0]) if rev else 0
