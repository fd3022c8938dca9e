"""The rule store: interface, the transactional logic shared by both backends, backend choice.

Both backends (:mod:`pricing_service.rules.sqlite`, :mod:`pricing_service.rules.postgres`)
only provide transactions (:class:`Tx`); every rule, revision and audit decision is made here,
once, so the two behave the same (one contract test suite runs against both).

Revisions. ``rule_meta.revision`` is the store-wide revision. A write transaction locks that
row first (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so writers
are serialised and *commit order equals revision order*: a reader that has seen revision R can
never later find a newly committed change with a revision <= R. Each changed rule takes the
next revision and writes one ``rule_changes`` row (the change feed and the audit trail); a
no-op upsert writes nothing and takes no revision.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pricing_service.config import Settings
from pricing_service.crowds import CrowdDef
from pricing_service.domain import Clock, CrowdKey, CrowdKind, Money, Rule, SystemClock
from pricing_service.errors import (
    ConfigError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    PricingError,
)
from pricing_service.rules.crowd_store import CrowdChange, CrowdStore
from pricing_service.rules.migrations import (
    CREATE_MIGRATIONS_TABLE,
    LATEST_VERSION,
    MIGRATIONS,
)

UPSERT = "UPSERT"
DELETE = "DELETE"

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class RuleChange:
    """One entry of the change feed / audit trail.

    ``rule`` is the rule as written (UPSERT) or as it was when deleted (DELETE).
    """

    revision: int
    action: str
    rule: Rule
    actor: str
    change_ms: int

    @property
    def deleted(self) -> bool:
        return self.action == DELETE

    @property
    def rule_id(self) -> str:
        return self.rule.rule_id

    @property
    def item_id(self) -> str:
        return self.rule.item_id


class RuleStore(Protocol):
    """Durable discount rules with a store-wide revision and a change feed."""

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; return the versions applied (idempotent)."""
        ...

    async def schema_version(self) -> int: ...

    async def upsert(self, rule: Rule, actor: str) -> tuple[Rule, bool]:
        """Create or replace the rule of (item, crowd); ``changed`` False for a no-op."""
        ...

    async def upsert_many(self, rules: Sequence[Rule], actor: str) -> list[Rule]:
        """Upsert all in one transaction: all or none."""
        ...

    async def get(self, rule_id: str) -> Rule: ...

    async def delete(self, rule_id: str, actor: str) -> int:
        """Delete; return the revision of the deletion (NotFoundError if unknown)."""
        ...

    async def list_rules(
        self, seller_id: str, item_id: str, page_size: int, page_token: str
    ) -> tuple[list[Rule], str]: ...

    async def rules_for_item(self, item_id: str) -> tuple[list[Rule], int]: ...

    async def current_revision(self) -> int: ...

    async def changes_since(self, revision: int, limit: int) -> list[RuleChange]: ...

    async def rules_for_items(self, item_ids: Sequence[str]) -> tuple[list[Rule], int]:
        """The rules of every named item and the revision they reflect (one snapshot)."""
        ...

    async def load_all(self, max_items: int | None = None) -> tuple[list[Rule], int]:
        """Every rule (or those of the first ``max_items + 1`` items by id) and the revision
        they reflect, from one snapshot: more than ``max_items`` items back means "there are
        more"."""
        ...

    async def history(
        self, seller_id: str, item_id: str, page_size: int, page_token: str
    ) -> tuple[list[RuleChange], str]: ...

    # seller-defined crowds (pricing_service.rules.crowd_store)
    async def create_crowd(self, crowd: CrowdDef, actor: str) -> CrowdDef: ...

    async def get_crowd(self, seller_id: str, crowd_id: str) -> CrowdDef: ...

    async def list_crowds(
        self, seller_id: str, page_size: int, page_token: str
    ) -> tuple[list[CrowdDef], str]: ...

    async def delete_crowd(self, seller_id: str, crowd_id: str, actor: str) -> int: ...

    async def record_member_change(
        self, seller_id: str, crowd_id: str, added: int, removed: int, actor: str
    ) -> int: ...

    async def crowd_history(
        self, seller_id: str, page_size: int, page_token: str
    ) -> tuple[list[CrowdChange], str]: ...

    async def crowd_revision(self) -> int: ...

    async def crowd_changes_since(self, revision: int, limit: int) -> list[CrowdChange]: ...

    async def load_crowds(self) -> tuple[list[CrowdDef], int]: ...

    async def rules_with_crowds(
        self, item_id: str
    ) -> tuple[list[Rule], dict[CrowdKey, CrowdDef], int]: ...

    async def close(self) -> None: ...


class Tx(Protocol):
    """One open transaction of a backend. SQL uses ``?`` placeholders."""

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int: ...


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


def refusal(
    cls: type[PricingError], field: str, description: str, reason: str, **meta: str
) -> PricingError:
    return cls(
        f"{field}: {description}",
        reason=reason,
        violations=[FieldViolation(field, description, reason)],
        metadata={"field": field, **meta},
    )


# --- page tokens --------------------------------------------------------------------------


def _filter_tag(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def encode_token(position: list[Any], *filters: str) -> str:
    raw = json.dumps({"p": position, "f": _filter_tag(*filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, *filters: str, field: str = "page_token") -> list[Any]:
    """The position a token encodes; INVALID_ARGUMENT if forged or from another query."""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position = data["p"]
        tag = data["f"]
        if not isinstance(position, list) or not isinstance(tag, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError):
        raise refusal(
            InvalidArgumentError, field, "is not a token this service issued", "INVALID_PAGE_TOKEN"
        ) from None
    if tag != _filter_tag(*filters):
        raise refusal(
            InvalidArgumentError,
            field,
            "was issued for a different query (filters changed between pages)",
            "INVALID_PAGE_TOKEN",
        )
    return position


# --- the shared implementation ------------------------------------------------------------


class SqlRuleStore(CrowdStore, ABC):
    """Everything but the connection handling; subclasses provide transactions. The crowd
    half is :class:`~pricing_service.rules.crowd_store.CrowdStore`."""

    #: SQL that reads and locks the revision counter inside a write transaction.
    LOCK_REVISION_SQL = "SELECT revision FROM rule_meta WHERE id = 1"

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.max_rules_per_item = settings.max_rules_per_item
        self.max_crowds_per_seller = settings.max_crowds_per_seller

    # backend hooks
    @abstractmethod
    def _write(self) -> AbstractAsyncContextManager[Tx]:
        """A serialised read-write transaction (committed on success, rolled back on error)."""

    @abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Tx]:
        """A read-only transaction on one consistent snapshot."""

    @abstractmethod
    def _migration_lock(self) -> AbstractAsyncContextManager[Tx]:
        """A transaction that holds the store's migration lock (DDL allowed)."""

    @abstractmethod
    async def close(self) -> None: ...

    async def _read_all(self, *queries: tuple[str, Sequence[object]]) -> list[list[Row]]:
        """Every query's rows, all from one snapshot (one read-only transaction)."""
        async with self._read() as tx:
            return [await tx.fetchall(sql, params) for sql, params in queries]

    # --- schema ---------------------------------------------------------------------------
    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._migration_lock() as tx:
            await tx.execute(CREATE_MIGRATIONS_TABLE)
            row = await tx.fetchone("SELECT MAX(version) FROM schema_migrations")
            current = int(row[0]) if row and row[0] is not None else 0
            if current > LATEST_VERSION:
                raise ConfigError(
                    f"the rule store's schema is at version {current}, newer than this program "
                    f"knows ({LATEST_VERSION}); upgrade the program",
                    reason="SCHEMA_TOO_NEW",
                )
            for m in MIGRATIONS:
                if m.version <= current:
                    continue
                for statement in m.statements:
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (?, ?, ?)",
                    (m.version, m.name, self.clock.now_ms()),
                )
                applied.append(m.version)
        return applied

    async def schema_version(self) -> int:
        [rows] = await self._read_all(("SELECT MAX(version) FROM schema_migrations", ()))
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

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
                raise refusal(
                    InvalidArgumentError,
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
                raise refusal(NotFoundError, "rule_id", f"no rule {rule_id!r}", "RULE_NOT_FOUND")
            rule = rule_from_row(row)
            revision = base + 1
            await tx.execute("DELETE FROM rules WHERE rule_id = ?", (rule_id,))
            await self._record(tx, revision, DELETE, rule, actor)
            await tx.execute("UPDATE rule_meta SET revision = ? WHERE id = 1", (revision,))
        return revision

    async def _lock_revision(self, tx: Tx) -> int:
        row = await tx.fetchone(self.LOCK_REVISION_SQL)
        if row is None:
            raise ConfigError(
                "rule store is not migrated (no rule_meta row)", reason="NOT_MIGRATED"
            )
        return int(row[0])

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
            raise refusal(
                FailedPreconditionError,
                f"{field}.item_id",
                f"item {rule.item_id!r} already has rules of another seller; "
                "an item's rules all belong to one seller",
                "ITEM_OWNED_BY_OTHER_SELLER",
            )
        existing = next((r for r in item_rules if r.crowd_key == rule.crowd_key), None)
        if rule.rule_id:
            if existing is not None and existing.rule_id != rule.rule_id:
                raise refusal(
                    FailedPreconditionError,
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
                    raise refusal(
                        FailedPreconditionError,
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
                raise refusal(
                    FailedPreconditionError,
                    f"{field}.crowd_id",
                    f"seller {rule.seller_id!r} has no crowd {rule.crowd_id!r}; create it first",
                    "CROWD_NOT_FOUND",
                )
        now = self.clock.now_ms()
        if existing is None:
            count = len(item_rules)
            if count >= self.max_rules_per_item:
                raise refusal(
                    FailedPreconditionError,
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
            raise refusal(NotFoundError, "rule_id", f"no rule {rule_id!r}", "RULE_NOT_FOUND")
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
                raise refusal(
                    InvalidArgumentError, "page_token", "is malformed", "INVALID_PAGE_TOKEN"
                )
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
        [rev] = await self._read_all(("SELECT revision FROM rule_meta WHERE id = 1", ()))
        return int(rev[0][0]) if rev else 0

    async def changes_since(self, revision: int, limit: int) -> list[RuleChange]:
        [rows] = await self._read_all(
            (
                f"SELECT {CHANGE_COLUMNS} FROM rule_changes WHERE revision > ?"
                " ORDER BY revision LIMIT ?",
                (revision, limit),
            )
        )
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
        where = ["seller_id = ?"]
        params: list[object] = [seller_id]
        if item_id:
            where.append("item_id = ?")
            params.append(item_id)
        if page_token:
            pos = decode_token(page_token, "history", seller_id, item_id)
            if len(pos) != 1 or not isinstance(pos[0], int):
                raise refusal(
                    InvalidArgumentError, "page_token", "is malformed", "INVALID_PAGE_TOKEN"
                )
            where.append("revision < ?")
            params.append(pos[0])
        params.append(page_size + 1)
        [rows] = await self._read_all(
            (
                f"SELECT {CHANGE_COLUMNS} FROM rule_changes WHERE {' AND '.join(where)}"
                " ORDER BY revision DESC LIMIT ?",
                params,
            )
        )
        changes = [change_from_row(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            token = encode_token([changes[-1].revision], "history", seller_id, item_id)
        return changes, token


# --- backend choice -----------------------------------------------------------------------


async def open_rule_store(
    settings: Settings, *, clock: Clock | None = None, migrate: bool = True
) -> SqlRuleStore:
    """Open the backend named by ``settings.rule_store_url``; apply migrations unless told not."""
    url = settings.rule_store_url
    store: SqlRuleStore
    if url.startswith("sqlite:///"):
        from pricing_service.rules.sqlite import SqliteRuleStore  # noqa: PLC0415

        store = await SqliteRuleStore.open(settings, clock)
    elif url.startswith(("postgresql://", "postgres://")):
        from pricing_service.rules.postgres import PostgresRuleStore  # noqa: PLC0415

        store = await PostgresRuleStore.open(settings, clock)
    else:
        raise ConfigError(f"PRICING_RULE_STORE_URL: unsupported scheme in {url!r}")
    if migrate:
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
    return store
