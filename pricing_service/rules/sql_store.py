"""The SQL rule store: the rule half of the implementation both backends share.

:class:`SqlRuleStore` is what the backends subclass: the rules, their revisions and change
feed (the revision rules are in :mod:`pricing_service.rules.sql`) over the crowd half
(:class:`~pricing_service.rules.crowd_store.CrowdStore`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace

from pricing_service.crowds import CrowdDef
from pricing_service.domain import CrowdKey, CrowdKind, Money, Rule
from pricing_service.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from pricing_service.rules.crowd_store import CROWD_COLUMNS, CrowdStore, crowd_from_row
from pricing_service.rules.sql import Row, Tx
from pricing_service.rules.store import DELETE, UPSERT, RuleChange
from pricing_service.rules.tokens import decode_token, encode_token, malformed_token

RULE_COLUMNS = (
    "rule_id, seller_id, item_id, crowd_kind, currency, amount_minor, start_ms, end_ms,"
    " revision, create_ms, update_ms, crowd_id"
)
CHANGE_COLUMNS = (
    "revision, action, rule_id, seller_id, item_id, crowd_kind, currency, amount_minor,"
    " start_ms, end_ms, rule_revision, create_ms, update_ms, actor, change_ms, crowd_id"
)


def rule_from_row(r: Row) -> Rule:
    return Rule(
        rule_id=r[0],
        seller_id=r[1],
        item_id=r[2],
        kind=CrowdKind(r[3]),
        price=Money(r[4], int(r[5])),
        start_ms=None if r[6] is None else int(r[6]),
        end_ms=None if r[7] is None else int(r[7]),
        revision=int(r[8]),
        create_ms=int(r[9]),
        update_ms=int(r[10]),
        crowd_id=r[11] or "",
    )


def change_from_row(r: Row) -> RuleChange:
    rule = rule_from_row(
        (r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[15])
    )
    return RuleChange(revision=int(r[0]), action=r[1], rule=rule, actor=r[13], change_ms=int(r[14]))


def crowd_name(rule: Rule) -> str:
    return rule.crowd_id or rule.kind.name.lower()


def same_content(a: Rule, b: Rule) -> bool:
    """Equal as a business record (ignores ids and output-only fields)."""
    return (
        a.seller_id == b.seller_id
        and a.item_id == b.item_id
        and a.kind == b.kind
        and a.crowd_id == b.crowd_id
        and a.price == b.price
        and a.start_ms == b.start_ms
        and a.end_ms == b.end_ms
    )


def new_rule_id() -> str:
    return uuid.uuid4().hex


def _no_rule(rule_id: str) -> NotFoundError:
    return NotFoundError.field("rule_id", f"no rule {rule_id!r}", "RULE_NOT_FOUND")


class SqlRuleStore(CrowdStore):
    """Everything but the connection handling; subclasses provide transactions (the hooks of
    :class:`~pricing_service.rules.sql.SqlBase`). The crowd half is
    :class:`~pricing_service.rules.crowd_store.CrowdStore`."""

    # --- writes ---------------------------------------------------------------------------
    async def upsert(self, rule: Rule, actor: str) -> tuple[Rule, bool]:
        async with self._write() as tx:
            base = await self._lock_revision(tx)
            out, changed = await self._upsert_one(tx, rule, actor, base + 1, "rule")
            if changed:
                await tx.execute("UPDATE rule_meta SET revision = ? WHERE id = 1", (base + 1,))
        return out, changed

    async def upsert_many(self, rules: Sequence[Rule], actor: str) -> list[Rule]:
        seen: dict[tuple[str, CrowdKey], int] = {}
        for i, r in enumerate(rules):
            key = (r.item_id, r.crowd_key)
            if key in seen:
                raise InvalidArgumentError.field(
                    f"rules[{i}]",
                    f"repeats the item and crowd of rules[{seen[key]}]",
                    "DUPLICATE_RULE",
                )
            seen[key] = i
        out: list[Rule] = []
        async with self._write() as tx:
            base = await self._lock_revision(tx)
            revision = base
            for i, r in enumerate(rules):
                written, changed = await self._upsert_one(tx, r, actor, revision + 1, f"rules[{i}]")
                if changed:
                    revision += 1
                out.append(written)
            if revision != base:
                await tx.execute("UPDATE rule_meta SET revision = ? WHERE id = 1", (revision,))
        return out

    async def delete(self, rule_id: str, actor: str) -> int:
        async with self._write() as tx:
            base = await self._lock_revision(tx)
            row = await tx.fetchone(
                f"SELECT {RULE_COLUMNS} FROM rules WHERE rule_id = ?", (rule_id,)
            )
            if row is None:
                raise _no_rule(rule_id)
            rule = rule_from_row(row)
            revision = base + 1
            await tx.execute("DELETE FROM rules WHERE rule_id = ?", (rule_id,))
            await self._record(tx, revision, DELETE, rule, actor)
            await tx.execute("UPDATE rule_meta SET revision = ? WHERE id = 1", (revision,))
        return revision

    async def _upsert_one(
        self, tx: Tx, rule: Rule, actor: str, revision: int, field: str
    ) -> tuple[Rule, bool]:
        # one read of the item's rules (at most max_rules_per_item) answers ownership,
        # replacement and the per-item limit
        item_rules = [
            rule_from_row(r)
            for r in await tx.fetchall(
                f"SELECT {RULE_COLUMNS} FROM rules WHERE item_id = ?", (rule.item_id,)
            )
        ]
        if any(r.seller_id != rule.seller_id for r in item_rules):
            raise FailedPreconditionError.field(
                f"{field}.item_id",
                f"item {rule.item_id!r} already has rules of another seller; "
                "an item's rules all belong to one seller",
                "ITEM_OWNED_BY_OTHER_SELLER",
            )
        existing = next((r for r in item_rules if r.crowd_key == rule.crowd_key), None)
        if rule.rule_id:
            if existing is not None and existing.rule_id != rule.rule_id:
                raise FailedPreconditionError.field(
                    f"{field}.rule_id",
                    f"item {rule.item_id!r} already has rule {existing.rule_id!r} for "
                    f"{crowd_name(rule)}; omit rule_id or use that one",
                    "RULE_ID_CONFLICT",
                )
            if existing is None:
                named = await tx.fetchone(
                    "SELECT item_id, crowd_kind, crowd_id FROM rules WHERE rule_id = ?",
                    (rule.rule_id,),
                )
                if named is not None:
                    raise FailedPreconditionError.field(
                        f"{field}.rule_id",
                        f"rule {rule.rule_id!r} belongs to item {named[0]!r} crowd "
                        f"{named[2] or CrowdKind(named[1]).name.lower()}, not to this item and "
                        "crowd",
                        "RULE_ID_CONFLICT",
                    )
        if rule.crowd_id and existing is None:
            crowd = await tx.fetchone(
                "SELECT form FROM crowds WHERE seller_id = ? AND crowd_id = ?",
                (rule.seller_id, rule.crowd_id),
            )
            if crowd is None:
                raise FailedPreconditionError.field(
                    f"{field}.crowd_id",
                    f"seller {rule.seller_id!r} has no crowd {rule.crowd_id!r}; create it first",
                    "CROWD_NOT_FOUND",
                )
        now = self.clock.now_ms()
        if existing is None:
            count = len(item_rules)
            if count >= self.max_rules_per_item:
                raise FailedPreconditionError.field(
                    f"{field}.item_id",
                    f"item {rule.item_id!r} has {count} rules, the limit is "
                    f"{self.max_rules_per_item}",
                    "TOO_MANY_RULES_FOR_ITEM",
                )
            written = replace(
                rule,
                rule_id=rule.rule_id or new_rule_id(),
                revision=revision,
                create_ms=now,
                update_ms=now,
            )
            await tx.execute(
                f"INSERT INTO rules ({RULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    written.rule_id,
                    written.seller_id,
                    written.item_id,
                    int(written.kind),
                    written.price.currency,
                    written.price.amount_minor,
                    written.start_ms,
                    written.end_ms,
                    revision,
                    now,
                    now,
                    written.crowd_id,
                ),
            )
        else:
            if same_content(existing, rule):
                return existing, False
            written = replace(
                existing,
                price=rule.price,
                start_ms=rule.start_ms,
                end_ms=rule.end_ms,
                revision=revision,
                update_ms=now,
            )
            await tx.execute(
                "UPDATE rules SET currency = ?, amount_minor = ?, start_ms = ?, end_ms = ?,"
                " revision = ?, update_ms = ? WHERE rule_id = ?",
                (
                    written.price.currency,
                    written.price.amount_minor,
                    written.start_ms,
                    written.end_ms,
                    revision,
                    now,
                    written.rule_id,
                ),
            )
        await self._record(tx, revision, UPSERT, written, actor)
        return written, True

    async def _record(self, tx: Tx, revision: int, action: str, rule: Rule, actor: str) -> None:
        await tx.execute(
            f"INSERT INTO rule_changes ({CHANGE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                revision,
                action,
                rule.rule_id,
                rule.seller_id,
                rule.item_id,
                int(rule.kind),
                rule.price.currency,
                rule.price.amount_minor,
                rule.start_ms,
                rule.end_ms,
                rule.revision,
                rule.create_ms,
                rule.update_ms,
                actor,
                self.clock.now_ms(),
                rule.crowd_id,
            ),
        )

    # --- reads ----------------------------------------------------------------------------
    async def get(self, rule_id: str) -> Rule:
        [rows] = await self._read_all(
            (f"SELECT {RULE_COLUMNS} FROM rules WHERE rule_id = ?", (rule_id,))
        )
        if not rows:
            raise _no_rule(rule_id)
        return rule_from_row(rows[0])

    async def list_rules(
        self, seller_id: str, item_id: str, page_size: int, page_token: str
    ) -> tuple[list[Rule], str]:
        """Rules ordered by (seller, item, crowd); keyset pages, so stable under writes."""
        where: list[str] = []
        params: list[object] = []
        if seller_id:
            where.append("seller_id = ?")
            params.append(seller_id)
        if item_id:
            where.append("item_id = ?")
            params.append(item_id)
        if page_token:
            pos = decode_token(page_token, "rules", seller_id, item_id)
            if len(pos) == 3:  # a token of a server before crowd ids: at most one per kind
                pos.append("")
            if len(pos) != 4 or not all(isinstance(p, str | int) for p in pos):
                raise malformed_token()
            where.append("(seller_id, item_id, crowd_kind, crowd_id) > (?, ?, ?, ?)")
            params.extend(pos)
        sql = f"SELECT {RULE_COLUMNS} FROM rules"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seller_id, item_id, crowd_kind, crowd_id LIMIT ?"
        params.append(page_size + 1)
        [rows] = await self._read_all((sql, params))
        rules = [rule_from_row(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = rules[-1]
            token = encode_token(
                [last.seller_id, last.item_id, int(last.kind), last.crowd_id],
                "rules",
                seller_id,
                item_id,
            )
        return rules, token

    async def rules_for_item(self, item_id: str) -> tuple[list[Rule], int]:
        rev, rows = await self._read_all(
            ("SELECT revision FROM rule_meta WHERE id = 1", ()),
            (
                f"SELECT {RULE_COLUMNS} FROM rules WHERE item_id = ? ORDER BY crowd_kind, crowd_id",
                (item_id,),
            ),
        )
        return [rule_from_row(r) for r in rows], int(rev[0][0]) if rev else 0

    async def current_revision(self) -> int:
        return await self._revision("rule_meta")

    async def changes_since(self, revision: int, limit: int) -> list[RuleChange]:
        rows = await self._feed("rule_changes", CHANGE_COLUMNS, revision, limit)
        return [change_from_row(r) for r in rows]

    async def rules_for_items(self, item_ids: Sequence[str]) -> tuple[list[Rule], int]:
        if not item_ids:
            return [], await self.current_revision()
        marks = ", ".join("?" * len(item_ids))
        rev, rows = await self._read_all(
            ("SELECT revision FROM rule_meta WHERE id = 1", ()),
            (
                f"SELECT {RULE_COLUMNS} FROM rules WHERE item_id IN ({marks})"
                " ORDER BY item_id, crowd_kind, crowd_id",
                tuple(item_ids),
            ),
        )
        return [rule_from_row(r) for r in rows], int(rev[0][0]) if rev else 0

    async def load_all(self, max_items: int | None = None) -> tuple[list[Rule], int]:
        if max_items is None:
            query: tuple[str, Sequence[object]] = (
                f"SELECT {RULE_COLUMNS} FROM rules ORDER BY item_id, crowd_kind, crowd_id",
                (),
            )
        else:
            query = (
                f"SELECT {RULE_COLUMNS} FROM rules WHERE item_id IN"
                " (SELECT DISTINCT item_id FROM rules ORDER BY item_id LIMIT ?)"
                " ORDER BY item_id, crowd_kind, crowd_id",
                (max_items + 1,),
            )
        rev, rows = await self._read_all(("SELECT revision FROM rule_meta WHERE id = 1", ()), query)
        return [rule_from_row(r) for r in rows], int(rev[0][0]) if rev else 0

    async def history(
        self, seller_id: str, item_id: str, page_size: int, page_token: str
    ) -> tuple[list[RuleChange], str]:
        """A seller's changes (optionally one item's), newest first."""
        where = [("seller_id", seller_id)]
        if item_id:
            where.append(("item_id", item_id))
        rows, token = await self._history(
            "rule_changes",
            CHANGE_COLUMNS,
            where,
            page_size,
            page_token,
            ("history", seller_id, item_id),
        )
        return [change_from_row(r) for r in rows], token

    async def rules_with_crowds(
        self, item_id: str
    ) -> tuple[list[Rule], dict[CrowdKey, CrowdDef], int]:
        """An item's rules, the definitions of the seller crowds they target and the rule
        revision, all from one snapshot (CheckDiscountStrict)."""
        rev, rows, crowd_rows = await self._read_all(
            ("SELECT revision FROM rule_meta WHERE id = 1", ()),
            (
                f"SELECT {RULE_COLUMNS} FROM rules WHERE item_id = ? ORDER BY crowd_kind, crowd_id",
                (item_id,),
            ),
            (
                f"SELECT {CROWD_COLUMNS} FROM crowds WHERE (seller_id, crowd_id) IN"
                " (SELECT seller_id, crowd_id FROM rules WHERE item_id = ? AND crowd_kind = ?)",
                (item_id, int(CrowdKind.SELLER_DEFINED)),
            ),
        )
        crowds = {(c.seller_id, c.crowd_id): c for c in map(crowd_from_row, crowd_rows)}
        return (
            [rule_from_row(r) for r in rows],
            crowds,  # type: ignore[return-value]  # (seller, crowd_id) keys are CrowdKeys
            int(rev[0][0]) if rev else 0,
        )
