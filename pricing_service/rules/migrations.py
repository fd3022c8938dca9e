"""Versioned schema migrations of the rule store, the same SQL for SQLite and PostgreSQL.

Each migration is a list of portable statements (``TEXT``, ``BIGINT``, ``INTEGER``), applied
once, in version order, inside one transaction together with its ``schema_migrations`` row.
Applied versions are never edited: a schema change is a new migration appended here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


CREATE_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " applied_ms BIGINT NOT NULL)"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "rules, store revision, change feed and audit trail",
        (
            # One row: the store-wide revision. Every write transaction locks it first, which
            # serialises writers, so commit order equals revision order.
            "CREATE TABLE rule_meta ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " revision BIGINT NOT NULL)",
            "INSERT INTO rule_meta (id, revision) VALUES (1, 0)",
            "CREATE TABLE rules ("
            " rule_id TEXT PRIMARY KEY,"
            " seller_id TEXT NOT NULL,"
            " item_id TEXT NOT NULL,"
            " crowd_kind INTEGER NOT NULL CHECK (crowd_kind BETWEEN 1 AND 3),"
            " currency TEXT NOT NULL,"
            " amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),"
            " start_ms BIGINT,"
            " end_ms BIGINT,"
            " revision BIGINT NOT NULL,"
            " create_ms BIGINT NOT NULL,"
            " update_ms BIGINT NOT NULL,"
            " CHECK (start_ms IS NULL OR end_ms IS NULL OR start_ms < end_ms),"
            " UNIQUE (item_id, crowd_kind))",
            "CREATE INDEX rules_by_seller ON rules (seller_id, item_id, crowd_kind)",
            # The change feed and the audit trail are one table: one row per revision.
            "CREATE TABLE rule_changes ("
            " revision BIGINT PRIMARY KEY,"
            " action TEXT NOT NULL CHECK (action IN ('UPSERT', 'DELETE')),"
            " rule_id TEXT NOT NULL,"
            " seller_id TEXT NOT NULL,"
            " item_id TEXT NOT NULL,"
            " crowd_kind INTEGER NOT NULL,"
            " currency TEXT NOT NULL,"
            " amount_minor BIGINT NOT NULL,"
            " start_ms BIGINT,"
            " end_ms BIGINT,"
            " rule_revision BIGINT NOT NULL,"
            " create_ms BIGINT NOT NULL,"
            " update_ms BIGINT NOT NULL,"
            " actor TEXT NOT NULL,"
            " change_ms BIGINT NOT NULL)",
            "CREATE INDEX rule_changes_by_seller ON rule_changes (seller_id, revision)",
            "CREATE INDEX rule_changes_by_item ON rule_changes (item_id, revision)",
        ),
    ),
)

_RULE_COLUMNS_V1 = (
    "rule_id, seller_id, item_id, crowd_kind, currency, amount_minor, start_ms, end_ms,"
    " revision, create_ms, update_ms"
)
_CROWD_COLUMNS = (
    " seller_id TEXT NOT NULL,"
    " crowd_id TEXT NOT NULL,"
    " display_name TEXT NOT NULL,"
    " form TEXT NOT NULL CHECK (form IN ('PREDICATE', 'LIST')),"
    " min_follow_days INTEGER,"
    " max_follow_days INTEGER,"
    " min_purchases INTEGER,"
    " purchased_within_days INTEGER,"
    " list_handle BIGINT,"
)

MIGRATIONS += (
    Migration(
        2,
        "seller-defined crowds: rules may target a crowd id; crowds, their revision and audit",
        (
            # rules: crowd_kind 4 = a seller-defined crowd, named by crowd_id; one rule per
            # (item, crowd). SQLite cannot drop a UNIQUE constraint: the table is rebuilt.
            "CREATE TABLE rules_v2 ("
            " rule_id TEXT PRIMARY KEY,"
            " seller_id TEXT NOT NULL,"
            " item_id TEXT NOT NULL,"
            " crowd_kind INTEGER NOT NULL CHECK (crowd_kind BETWEEN 1 AND 4),"
            " currency TEXT NOT NULL,"
            " amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),"
            " start_ms BIGINT,"
            " end_ms BIGINT,"
            " revision BIGINT NOT NULL,"
            " create_ms BIGINT NOT NULL,"
            " update_ms BIGINT NOT NULL,"
            " crowd_id TEXT NOT NULL DEFAULT '',"
            " CHECK (start_ms IS NULL OR end_ms IS NULL OR start_ms < end_ms),"
            " CHECK ((crowd_kind = 4 AND crowd_id <> '') OR (crowd_kind < 4 AND crowd_id = '')),"
            " UNIQUE (item_id, crowd_kind, crowd_id))",
            f"INSERT INTO rules_v2 ({_RULE_COLUMNS_V1}, crowd_id)"
            f" SELECT {_RULE_COLUMNS_V1}, '' FROM rules",
            "DROP TABLE rules",
            "ALTER TABLE rules_v2 RENAME TO rules",
            "CREATE INDEX rules_by_seller ON rules (seller_id, item_id, crowd_kind, crowd_id)",
            "CREATE INDEX rules_by_crowd ON rules (seller_id, crowd_id)",
            "ALTER TABLE rule_changes ADD COLUMN crowd_id TEXT NOT NULL DEFAULT ''",
            # crowds have a revision counter of their own (the rule index's feed stays gapless)
            # and hand out list handles that are never reused
            "CREATE TABLE crowd_meta ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " revision BIGINT NOT NULL,"
            " next_list_handle BIGINT NOT NULL)",
            "INSERT INTO crowd_meta (id, revision, next_list_handle) VALUES (1, 0, 1)",
            "CREATE TABLE crowds (" + _CROWD_COLUMNS + " revision BIGINT NOT NULL,"
            " create_ms BIGINT NOT NULL,"
            " update_ms BIGINT NOT NULL,"
            " PRIMARY KEY (seller_id, crowd_id))",
            # the crowds' change feed and audit trail: one row per revision
            "CREATE TABLE crowd_changes ("
            " revision BIGINT PRIMARY KEY,"
            " action TEXT NOT NULL CHECK (action IN ('CREATE', 'DELETE', 'MEMBERS')),"
            + _CROWD_COLUMNS
            + " crowd_revision BIGINT NOT NULL,"
            " create_ms BIGINT NOT NULL,"
            " update_ms BIGINT NOT NULL,"
            " added BIGINT NOT NULL,"
            " removed BIGINT NOT NULL,"
            " actor TEXT NOT NULL,"
            " change_ms BIGINT NOT NULL)",
            "CREATE INDEX crowd_changes_by_seller ON crowd_changes (seller_id, revision)",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
