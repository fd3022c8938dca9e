"""Command-line rule tools: ``pricing-service migrate`` and ``pricing-service rules ...``.

They open the rule store named by ``PRICING_RULE_STORE_URL`` directly (no server needed; with
SQLite the file may be open by a running server at the same time). Each returns a process
exit code: 0 done, 1 refused (the reasons are printed, nothing was written).

Import file formats (one seller's prices for many items, applied atomically):

* JSON lines (``.jsonl``/``.ndjson``/``.json``): one object per line,
  ``{"seller_id": "42", "item_id": "1001", "crowd": "all_fans", "price": "18.88",
  "currency": "CNY"}`` (+ optional ``start_time``/``end_time`` RFC 3339, ``rule_id``); ``crowd``
  is a built-in crowd or the id of one of the seller's crowds (``"crowd": "vip30"``);
* CSV (``.csv``): a header row naming the same columns.

Prices are human decimals converted exactly (``decimal.Decimal``) with the currency's
exponent; more decimals than the currency allows is refused.
"""

from __future__ import annotations

import csv
import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from pricing_service.config import Settings
from pricing_service.currency import MINOR_UNITS
from pricing_service.domain import Rule
from pricing_service.errors import FieldViolation, InvalidArgumentError, PricingError
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.human_input import rule_from_human

MAX_IMPORT_ROWS = 100_000
MAX_REPORTED_ERRORS = 20


def minor_to_decimal(amount_minor: int, currency: str) -> str:
    exp = MINOR_UNITS.get(currency, 0)
    return str(Decimal(amount_minor).scaleb(-exp)) if exp else str(amount_minor)


def rule_line(rule: Rule) -> str:
    return json.dumps(
        {
            "rule_id": rule.rule_id,
            "seller_id": rule.seller_id,
            "item_id": rule.item_id,
            "crowd": rule.crowd_id or rule.kind.name.lower(),
            "price": minor_to_decimal(rule.price.amount_minor, rule.price.currency),
            "currency": rule.price.currency,
            "amount_minor": rule.price.amount_minor,
            "start_ms": rule.start_ms,
            "end_ms": rule.end_ms,
            "revision": rule.revision,
        },
        ensure_ascii=False,
    )


async def migrate(settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    store = await open_rule_store(settings, migrate=False)
    try:
        applied = await store.migrate()
        version = await store.schema_version()
    finally:
        await store.close()
    if applied:
        print(f"applied migrations {applied}; schema version {version}", file=out)
    else:
        print(f"schema up to date (version {version})", file=out)
    return 0


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, row) pairs; the label names the line for error messages."""
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv" or (
        path.suffix.lower() not in (".jsonl", ".ndjson", ".json")
        and not text.lstrip().startswith("{")
    ):
        reader = csv.DictReader(text.splitlines())
        for n, rec in enumerate(reader, start=2):
            if None in rec:
                raise InvalidArgumentError.field(
                    f"line {n}", "has more cells than the header", "MALFORMED_ROW"
                )
            rows.append((f"line {n}", {k.strip(): (v or "").strip() for k, v in rec.items()}))
        return rows
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_float=Decimal)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError.field(
                f"line {n}", f"not JSON: {exc.msg}", "MALFORMED_ROW"
            ) from None
        if not isinstance(obj, dict):
            raise InvalidArgumentError.field(f"line {n}", "must be a JSON object", "MALFORMED_ROW")
        rows.append((f"line {n}", obj))
    return rows


def read_import_file(path: str | Path, max_id_length: int, out: TextIO) -> list[Rule] | None:
    """Every row of an import file as a rule, or ``None`` after printing why the file is
    refused (unreadable, empty, too long, or each bad row's fields)."""
    p = Path(path)
    try:
        rows = read_rows(p)
    except OSError as exc:
        print(f"cannot read {p}: {exc.strerror}", file=out)
        return None
    except InvalidArgumentError as exc:
        report(out, exc.violations)
        return None
    if not rows:
        print(f"refused: {p} holds no rules", file=out)
        return None
    if len(rows) > MAX_IMPORT_ROWS:
        print(f"refused: {len(rows)} rows exceed the limit of {MAX_IMPORT_ROWS}", file=out)
        return None
    rules: list[Rule] = []
    problems: list[FieldViolation] = []
    for label, row in rows:
        try:
            rules.append(rule_from_human(row, label, max_id_length=max_id_length))
        except InvalidArgumentError as exc:
            problems.extend(exc.violations)
    if problems:
        report(out, problems)
        return None
    return rules


async def import_rules(
    settings: Settings, path: str | Path, actor: str, out: TextIO | None = None
) -> int:
    """Validate every row, then upsert them all in one transaction (all or nothing)."""
    out = out or sys.stdout
    rules = read_import_file(path, settings.max_id_length, out)
    if rules is None:
        return 1
    sellers = sorted({r.seller_id for r in rules})
    store = await open_rule_store(settings)
    try:
        before = await store.current_revision()
        try:
            written = await store.upsert_many(rules, actor)
        except PricingError as exc:
            return report(out, exc.violations or [FieldViolation("", exc.message, exc.reason)])
        after = max([before, *(r.revision for r in written)])
    finally:
        await store.close()
    changed = sum(1 for r in written if r.revision > before)
    print(
        f"imported {len(written)} rules for seller(s) {', '.join(sellers)}: {changed} changed, "
        f"{len(written) - changed} already up to date; store revision {after}",
        file=out,
    )
    return 0


def report(out: TextIO, problems: list[FieldViolation]) -> int:
    print(f"refused, nothing written ({len(problems)} problem(s)):", file=out)
    for v in problems[:MAX_REPORTED_ERRORS]:
        print(f"  {v.field}: {v.reason}: {v.description}", file=out)
    if len(problems) > MAX_REPORTED_ERRORS:
        print(f"  ... and {len(problems) - MAX_REPORTED_ERRORS} more", file=out)
    return 1


async def upsert_rule(
    settings: Settings,
    *,
    seller_id: str,
    item_id: str,
    crowd: str,
    price: str,
    currency: str,
    start: str | None = None,
    end: str | None = None,
    actor: str = "cli",
    rule_id: str = "",
    out: TextIO | None = None,
) -> int:
    """Create or replace one rule; raises InvalidArgumentError/FailedPreconditionError."""
    out = out or sys.stdout
    rule = rule_from_human(
        {
            "rule_id": rule_id,
            "seller_id": seller_id,
            "item_id": item_id,
            "crowd": crowd,
            "price": price,
            "currency": currency,
            "start_time": start,
            "end_time": end,
        },
        "rule",
        max_id_length=settings.max_id_length,
    )
    store = await open_rule_store(settings)
    try:
        written, changed = await store.upsert(rule, actor)
    finally:
        await store.close()
    print(rule_line(written), file=out)
    if not changed:
        print("(unchanged: the stored rule already had these values)", file=sys.stderr)
    return 0


async def list_rules(
    settings: Settings, *, seller_id: str = "", item_id: str = "", out: TextIO | None = None
) -> int:
    """Every rule of the seller and/or item (all rules if neither), one JSON object a line."""
    out = out or sys.stdout
    store = await open_rule_store(settings)
    try:
        token = ""
        while True:
            rules, token = await store.list_rules(seller_id, item_id, 500, token)
            for r in rules:
                print(rule_line(r), file=out)
            if not token:
                break
    finally:
        await store.close()
    return 0
