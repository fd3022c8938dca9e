"""Human input of rules (the CLI, import files): decimal prices and RFC 3339 times.

Converted to what a gRPC caller sends, then checked by the same models
(:mod:`pricing_service.rules.validation`), so a rule is refused the same way whatever its
source; only the conversion's own refusals (a price more precise than its currency, a time
without a UTC offset) are made here.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pricing_service.crowds import BUILTIN_NAMES
from pricing_service.currency import MINOR_UNITS
from pricing_service.domain import Rule
from pricing_service.errors import InvalidArgumentError
from pricing_service.rules.validation import DEFAULT_MAX_ID_LENGTH, RuleIn, validate


def decimal_to_minor(text: object, currency: str, field: str) -> int:
    """``"18.88"`` CNY → 1888, exactly; refuses more decimals than the currency has."""
    if currency not in MINOR_UNITS:
        raise InvalidArgumentError.field(
            field.rsplit(".", 1)[0] + ".currency" if "." in field else "currency",
            f"{currency!r} is not an ISO-4217 currency code",
            "UNKNOWN_CURRENCY",
        )
    if isinstance(text, (bool, float)):
        raise InvalidArgumentError.field(
            field, 'must be a decimal string such as "18.88" (not a float)', "INVALID_PRICE"
        )
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise InvalidArgumentError.field(
            field, f"{text!r} is not a decimal number", "INVALID_PRICE"
        ) from None
    if not value.is_finite():
        raise InvalidArgumentError.field(field, "must be a finite number", "INVALID_PRICE")
    exp = MINOR_UNITS[currency]
    minor = value.scaleb(exp)
    if minor != minor.to_integral_value():
        raise InvalidArgumentError.field(
            field,
            f"{currency} allows at most {exp} decimal places, got {text}",
            "PRICE_TOO_PRECISE",
        )
    return int(minor)


def parse_time(text: str | None, field: str) -> int | None:
    """RFC 3339 (``2026-11-25T12:00:00Z``) → UTC ms; ``None``/empty → ``None``."""
    if text is None or text == "":
        return None
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgumentError.field(
            field, f"{text!r} is not an RFC 3339 time", "INVALID_TIME"
        ) from None
    if dt.tzinfo is None:
        raise InvalidArgumentError.field(
            field, "must carry a UTC offset (e.g. 'Z' or '+08:00')", "INVALID_TIME"
        )
    return int(dt.timestamp() * 1000)


IMPORT_FIELDS = (
    "rule_id",
    "seller_id",
    "item_id",
    "crowd",
    "crowd_id",
    "price",
    "currency",
    "start_time",
    "end_time",
)


def rule_from_human(
    row: dict[str, Any], prefix: str, *, max_id_length: int = DEFAULT_MAX_ID_LENGTH
) -> Rule:
    """One import row / CLI call: decimal ``price`` + ``currency``, RFC 3339 times."""
    unknown = sorted(set(row) - set(IMPORT_FIELDS))
    if unknown:
        raise InvalidArgumentError.field(
            f"{prefix}.{unknown[0]}",
            f"unknown field (expected some of {', '.join(IMPORT_FIELDS)})",
            "UNKNOWN_FIELD",
        )
    for required in ("price", "currency"):
        if row.get(required) in (None, ""):
            raise InvalidArgumentError.field(f"{prefix}.{required}", "is required", "MISSING_FIELD")
    currency = str(row["currency"]).strip().upper()
    crowd, crowd_id = row.get("crowd", 0), row.get("crowd_id") or ""
    if isinstance(crowd, str) and not crowd_id:
        name = crowd.strip()
        if name.lower() not in BUILTIN_NAMES and not name.upper().startswith("CROWD_KIND_"):
            crowd, crowd_id = 0, name  # --crowd vip30: the seller's crowd vip30
    data = {
        "rule_id": row.get("rule_id") or "",
        "seller_id": row.get("seller_id", ""),
        "item_id": row.get("item_id", ""),
        "crowd": crowd,
        "crowd_id": crowd_id,
        "price": {
            "currency_code": currency,
            "amount_minor": decimal_to_minor(row["price"], currency, f"{prefix}.price"),
        },
        "start_time": parse_time(row.get("start_time"), f"{prefix}.start_time"),
        "end_time": parse_time(row.get("end_time"), f"{prefix}.end_time"),
    }
    return validate(RuleIn, data, prefix=prefix, max_id_length=max_id_length).to_domain()
