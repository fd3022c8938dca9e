"""Validation of rules at the boundary (gRPC requests, import files, the CLI).

pydantic models with ``extra='forbid'`` (an unknown field is refused, never ignored). Every
refusal becomes an :class:`InvalidArgumentError` whose violations name the request path of
the field (``rule.price.amount_minor``, ``rules[3].item_id``) and carry an UPPER_SNAKE reason.

Human input (decimal prices, RFC 3339 times: the CLI, import files) is converted by
:mod:`pricing_service.rules.human_input`, then checked here like any request.

Rules the store must decide (an item owned by another seller, the per-item limit, rule id
conflicts) are checked in the store's transaction, not here.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pricing_service.crowds import (
    BUILTIN_NAMES,
    CROWD_ID,
    MAX_DAYS,
    MAX_PURCHASES,
    CrowdDef,
    Predicate,
)
from pricing_service.currency import MAX_AMOUNT_MINOR, MINOR_UNITS
from pricing_service.domain import CrowdKind, Money, Rule
from pricing_service.errors import FieldViolation, InvalidArgumentError

#: Latest instant accepted: 9999-12-31T23:59:59.999Z.
MAX_TIME_MS = 253_402_300_799_999
DEFAULT_MAX_ID_LENGTH = 128

_BUILTIN_REASONS = {
    "missing": "MISSING_FIELD",
    "extra_forbidden": "UNKNOWN_FIELD",
    "int_type": "WRONG_TYPE",
    "int_parsing": "WRONG_TYPE",
    "int_from_float": "WRONG_TYPE",
    "string_type": "WRONG_TYPE",
    "list_type": "WRONG_TYPE",
    "model_type": "WRONG_TYPE",
    "model_attributes_type": "WRONG_TYPE",
    "dict_type": "WRONG_TYPE",
    "too_long": "TOO_MANY",
    "too_short": "EMPTY_LIST",
}


def _refuse(reason: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(reason, message)


def check_id(value: str, info: ValidationInfo, *, allow_empty: bool = False) -> str:
    max_len = (info.context or {}).get("max_id_length", DEFAULT_MAX_ID_LENGTH)
    if not value:
        if allow_empty:
            return value
        raise _refuse("MISSING_ID", "must not be empty")
    if len(value) > max_len:
        raise _refuse("ID_TOO_LONG", f"longer than {max_len} characters")
    if not value.isprintable() or value != value.strip():
        raise _refuse("INVALID_ID", "must not contain control characters or surrounding spaces")
    return value


#: Model-level refusals and the field each one is about (pydantic gives them no field).
_MODEL_ERROR_FIELDS = {
    "EMPTY_VALIDITY_WINDOW": "end_time",
    "CONFLICTING_CROWD": "crowd_id",
    "MISSING_CROWD_ID": "crowd_id",
    "INVALID_CROWD_ID": "crowd_id",
    "EMPTY_CROWD": "max_follow_days",
    "MISSING_DEFINITION": "predicate",
    "CONFLICTING_DEFINITION": "list",
}


def _optional_kind(value: object) -> CrowdKind | None:
    """The crowd kind of a raw value, ``None`` when unspecified (0, empty)."""
    if value in (None, 0, "") or (
        isinstance(value, str)
        and value.strip().upper() in ("UNSPECIFIED", "CROWD_KIND_UNSPECIFIED")
    ):
        return None
    return parse_crowd(value)


def check_crowd_id(value: str) -> str:
    if not CROWD_ID.fullmatch(value):
        raise _refuse(
            "INVALID_CROWD_ID",
            f"{value[:70]!r} is not a crowd id (1-63 of a-z, 0-9, '-', '_', starting with a "
            "letter or digit)",
        )
    if value in BUILTIN_NAMES:
        raise _refuse("RESERVED_CROWD_ID", f"{value!r} is a built-in crowd")
    return value


def parse_crowd(value: object) -> CrowdKind:
    """A crowd kind from an enum number (1..4) or a name (``all_fans``, ``CROWD_KIND_ALL_FANS``)."""
    if isinstance(value, CrowdKind):
        return value
    if isinstance(value, bool):
        raise _refuse("INVALID_CROWD", "must be a crowd kind")
    if isinstance(value, int):
        if value == 0:
            raise _refuse("CROWD_KIND_UNSPECIFIED", "the crowd kind must be set")
        try:
            return CrowdKind(value)
        except ValueError:
            raise _refuse("INVALID_CROWD", f"unknown crowd kind {value}") from None
    if isinstance(value, str):
        name = value.strip().upper().removeprefix("CROWD_KIND_")
        if name in ("", "UNSPECIFIED"):
            raise _refuse("CROWD_KIND_UNSPECIFIED", "the crowd kind must be set")
        try:
            return CrowdKind[name]
        except KeyError:
            choices = ", ".join(k.name.lower() for k in CrowdKind)
            raise _refuse("INVALID_CROWD", f"unknown crowd {value!r} (one of {choices})") from None
    raise _refuse("INVALID_CROWD", "must be a crowd kind")


class PriceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    currency_code: str
    amount_minor: int = Field(strict=True)

    @field_validator("currency_code")
    @classmethod
    def _currency(cls, v: str) -> str:
        if v not in MINOR_UNITS:
            raise _refuse(
                "UNKNOWN_CURRENCY",
                f"{v!r} is not an ISO-4217 currency code" if v else "must not be empty",
            )
        return v

    @field_validator("amount_minor")
    @classmethod
    def _amount(cls, v: int) -> int:
        if v < 0:
            raise _refuse("NEGATIVE_PRICE", f"must be > 0, got {v}")
        if v == 0:
            raise _refuse("ZERO_PRICE", "must be > 0")
        if v > MAX_AMOUNT_MINOR:
            raise _refuse("PRICE_TOO_LARGE", f"must be at most {MAX_AMOUNT_MINOR}")
        return v


class RuleIn(BaseModel):
    """A rule as a caller sends it; times are UTC milliseconds (``None`` = open-ended)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule_id: str = ""
    seller_id: str
    item_id: str
    crowd: CrowdKind
    #: the seller's crowd (``crowd`` then SELLER_DEFINED or unspecified); a built-in crowd's
    #: name here means that built-in crowd
    crowd_id: str = ""
    price: PriceIn
    start_time: int | None = Field(default=None, strict=True)
    end_time: int | None = Field(default=None, strict=True)

    @field_validator("rule_id")
    @classmethod
    def _rule_id(cls, v: str, info: ValidationInfo) -> str:
        return check_id(v, info, allow_empty=True)

    @field_validator("seller_id", "item_id")
    @classmethod
    def _ids(cls, v: str, info: ValidationInfo) -> str:
        return check_id(v, info)

    @field_validator("crowd", mode="before")
    @classmethod
    def _crowd(cls, v: object) -> CrowdKind:
        return parse_crowd(v)

    @model_validator(mode="before")
    @classmethod
    def _crowd_ref(cls, data: Any) -> Any:
        """A crowd id names the crowd; the kind then is SELLER_DEFINED (or unspecified)."""
        if not isinstance(data, dict):
            return data
        cid = data.get("crowd_id")
        if not isinstance(cid, str) or not cid:
            return data
        kind = _optional_kind(data.get("crowd"))
        builtin = BUILTIN_NAMES.get(cid)
        if builtin is not None:
            if kind is not None and kind != builtin:
                raise _refuse("CONFLICTING_CROWD", f"crowd {kind.name} and crowd_id {cid!r} differ")
            return {**data, "crowd": builtin, "crowd_id": ""}
        check_crowd_id(cid)
        if kind not in (None, CrowdKind.SELLER_DEFINED):
            raise _refuse(
                "CONFLICTING_CROWD",
                f"a rule targets a built-in crowd ({kind.name}) or a crowd id ({cid!r}), not both",
            )
        return {**data, "crowd": CrowdKind.SELLER_DEFINED}

    @field_validator("start_time", "end_time")
    @classmethod
    def _time(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TIME_MS:
            raise _refuse("TIME_OUT_OF_RANGE", "must be between 1970 and 9999")
        return v

    @model_validator(mode="after")
    def _window(self) -> RuleIn:
        s, e = self.start_time, self.end_time
        if s is not None and e is not None and s >= e:
            raise _refuse("EMPTY_VALIDITY_WINDOW", "start_time must be before end_time")
        if self.crowd == CrowdKind.SELLER_DEFINED and not self.crowd_id:
            raise _refuse("MISSING_CROWD_ID", "a SELLER_DEFINED crowd needs its crowd_id")
        return self

    def to_domain(self) -> Rule:
        return Rule(
            rule_id=self.rule_id,
            seller_id=self.seller_id,
            item_id=self.item_id,
            kind=self.crowd,
            price=Money(self.price.currency_code, self.price.amount_minor),
            start_ms=self.start_time,
            end_ms=self.end_time,
            crowd_id=self.crowd_id,
        )


def _days(v: int | None, *, minimum: int) -> int | None:
    if v is None:
        return v
    if v < 0:
        raise _refuse("NEGATIVE_THRESHOLD", f"must not be negative, got {v}")
    if v < minimum:
        raise _refuse("THRESHOLD_TOO_SMALL", f"must be at least {minimum}, got {v}")
    if v > MAX_DAYS:
        raise _refuse("THRESHOLD_TOO_LARGE", f"must be at most {MAX_DAYS} days, got {v}")
    return v


class PredicateIn(BaseModel):
    """A predicate crowd's conditions (each optional; the buyer always follows the seller)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_follow_days: int | None = Field(default=None, strict=True)
    max_follow_days: int | None = Field(default=None, strict=True)
    min_purchases: int | None = Field(default=None, strict=True)
    purchased_within_days: int | None = Field(default=None, strict=True)

    @field_validator("min_follow_days")
    @classmethod
    def _min_days(cls, v: int | None) -> int | None:
        return _days(v, minimum=0)

    @field_validator("max_follow_days", "purchased_within_days")
    @classmethod
    def _max_days(cls, v: int | None) -> int | None:
        return _days(v, minimum=1)

    @field_validator("min_purchases")
    @classmethod
    def _purchases(cls, v: int | None) -> int | None:
        if v is None:
            return v
        if v < 0:
            raise _refuse("NEGATIVE_THRESHOLD", f"must not be negative, got {v}")
        if v > MAX_PURCHASES:
            raise _refuse("THRESHOLD_TOO_LARGE", f"must be at most {MAX_PURCHASES}, got {v}")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> PredicateIn:
        lo, hi = self.min_follow_days, self.max_follow_days
        if lo is not None and hi is not None and lo > hi:
            raise _refuse(
                "EMPTY_CROWD",
                f"followed at least {lo} and at most {hi} days: nobody can be in this crowd",
            )
        return self

    def to_domain(self) -> Predicate:
        return Predicate(
            min_follow_days=self.min_follow_days or 0,
            max_follow_days=self.max_follow_days,
            min_purchases=self.min_purchases or 0,
            purchased_within_days=self.purchased_within_days,
        )


class CrowdIn(BaseModel):
    """A crowd as a caller defines it: a predicate or an explicit list, not both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seller_id: str
    crowd_id: str
    display_name: str = ""
    predicate: PredicateIn | None = None
    list: bool = False

    @field_validator("seller_id")
    @classmethod
    def _seller(cls, v: str, info: ValidationInfo) -> str:
        return check_id(v, info)

    @field_validator("crowd_id")
    @classmethod
    def _crowd_id(cls, v: str) -> str:
        return check_crowd_id(v)

    @field_validator("display_name")
    @classmethod
    def _display(cls, v: str) -> str:
        if len(v) > 200:
            raise _refuse("NAME_TOO_LONG", "longer than 200 characters")
        if not v.isprintable():
            raise _refuse("INVALID_NAME", "must not contain control characters")
        return v

    @model_validator(mode="after")
    def _one_form(self) -> CrowdIn:
        if self.predicate is None and not self.list:
            raise _refuse("MISSING_DEFINITION", "a crowd is a predicate or a list: give one")
        if self.predicate is not None and self.list:
            raise _refuse("CONFLICTING_DEFINITION", "a crowd is a predicate or a list, not both")
        return self

    def to_domain(self) -> CrowdDef:
        return CrowdDef(
            seller_id=self.seller_id,
            crowd_id=self.crowd_id,
            predicate=self.predicate.to_domain() if self.predicate is not None else None,
            display_name=self.display_name,
        )


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[RuleIn]

    @field_validator("rules")
    @classmethod
    def _bounded(cls, v: list[RuleIn], info: ValidationInfo) -> list[RuleIn]:
        limit = (info.context or {}).get("max_rule_batch", 1000)
        if not v:
            raise _refuse("EMPTY_BATCH", "must not be empty")
        if len(v) > limit:
            raise _refuse("BATCH_TOO_LARGE", f"{len(v)} rules exceed the limit of {limit}")
        return v


M = TypeVar("M", bound=BaseModel)


def field_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def to_invalid_argument(exc: ValidationError, prefix: str) -> InvalidArgumentError:
    """One INVALID_ARGUMENT carrying every violation pydantic found."""
    violations: list[FieldViolation] = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # a model validator's error has no field of its own: blame the field it is about
        about = _MODEL_ERROR_FIELDS.get(err["type"])
        if about is not None and (not loc or loc[-1] != about):
            loc = (*loc, about)
        reason = _BUILTIN_REASONS.get(err["type"], err["type"])
        if not reason.isupper():
            reason = "INVALID_VALUE"
        violations.append(FieldViolation(field_path(prefix, loc) or prefix, err["msg"], reason))
    first = violations[0]
    return InvalidArgumentError(
        f"{first.field}: {first.description}"
        + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""),
        reason=first.reason,
        violations=violations,
        metadata={"field": first.field},
    )


def validate(
    model: type[M],
    data: Any,
    *,
    prefix: str = "",
    max_id_length: int = DEFAULT_MAX_ID_LENGTH,
    max_rule_batch: int = 1000,
) -> M:
    try:
        return model.model_validate(
            data, context={"max_id_length": max_id_length, "max_rule_batch": max_rule_batch}
        )
    except ValidationError as exc:
        raise to_invalid_argument(exc, prefix) from None
