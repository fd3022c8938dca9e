"""Boundary validation of rules, exact decimal prices and page tokens (no I/O)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricing_service.currency import MAX_AMOUNT_MINOR, MINOR_UNITS
from pricing_service.domain import CrowdKind, Money, Rule
from pricing_service.errors import InvalidArgumentError
from pricing_service.rules.cli import minor_to_decimal
from pricing_service.rules.human_input import decimal_to_minor, parse_time, rule_from_human
from pricing_service.rules.tokens import decode_token, encode_token
from pricing_service.rules.validation import BatchIn, RuleIn, parse_crowd, validate

GOOD: dict[str, Any] = {
    "seller_id": "42",
    "item_id": "1001",
    "crowd": 1,
    "price": {"currency_code": "CNY", "amount_minor": 1888},
}


def refused(data: Any, **kw: Any) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        validate(RuleIn, data, prefix="rule", **kw)
    return info.value


def test_a_good_rule_becomes_the_domain_rule() -> None:
    rule = validate(RuleIn, {**GOOD, "start_time": 1, "end_time": 2}).to_domain()
    assert rule == Rule("", "42", "1001", CrowdKind.ALL_FANS, Money("CNY", 1888), 1, 2)


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"seller_id": ""}, "rule.seller_id", "MISSING_ID"),
        ({"item_id": "x" * 129}, "rule.item_id", "ID_TOO_LONG"),
        ({"item_id": " padded"}, "rule.item_id", "INVALID_ID"),
        ({"item_id": "tab\there"}, "rule.item_id", "INVALID_ID"),
        ({"seller_id": 42}, "rule.seller_id", "WRONG_TYPE"),
        ({"crowd": 0}, "rule.crowd", "CROWD_KIND_UNSPECIFIED"),
        ({"crowd": "CROWD_KIND_UNSPECIFIED"}, "rule.crowd", "CROWD_KIND_UNSPECIFIED"),
        ({"crowd": 5}, "rule.crowd", "INVALID_CROWD"),
        ({"crowd": True}, "rule.crowd", "INVALID_CROWD"),
        ({"crowd": "vips"}, "rule.crowd", "INVALID_CROWD"),
        ({"price": {"currency_code": "CNY", "amount_minor": 0}}, "rule.price.amount_minor", "ZERO_PRICE"),
        ({"price": {"currency_code": "CNY", "amount_minor": -1}}, "rule.price.amount_minor", "NEGATIVE_PRICE"),
        ({"price": {"currency_code": "CNY", "amount_minor": MAX_AMOUNT_MINOR + 1}},
         "rule.price.amount_minor", "PRICE_TOO_LARGE"),
        ({"price": {"currency_code": "CNY", "amount_minor": 18.88}}, "rule.price.amount_minor", "WRONG_TYPE"),
        ({"price": {"currency_code": "CNY", "amount_minor": "1888"}}, "rule.price.amount_minor", "WRONG_TYPE"),
        ({"price": {"currency_code": "RMB", "amount_minor": 1}}, "rule.price.currency_code", "UNKNOWN_CURRENCY"),
        ({"price": {"currency_code": "CNY", "amount_minor": 1, "nanos": 5}}, "rule.price.nanos", "UNKNOWN_FIELD"),
        ({"price": None}, "rule.price", "WRONG_TYPE"),
        ({"colour": "red"}, "rule.colour", "UNKNOWN_FIELD"),
        ({"start_time": 5, "end_time": 5}, "rule.end_time", "EMPTY_VALIDITY_WINDOW"),
        ({"start_time": -1}, "rule.start_time", "TIME_OUT_OF_RANGE"),
        ({"end_time": 10**16}, "rule.end_time", "TIME_OUT_OF_RANGE"),
        ({"end_time": "tomorrow"}, "rule.end_time", "WRONG_TYPE"),
    ],
)  # fmt: skip
def test_each_bad_field_is_named_with_its_reason(
    change: dict[str, Any], field: str, reason: str
) -> None:
    err = refused({**GOOD, **change})
    assert (err.violations[0].field, err.violations[0].reason) == (field, reason)
    assert err.reason == reason
    assert err.metadata["field"] == field


def test_missing_fields_are_all_reported() -> None:
    err = refused({})
    assert {(v.field, v.reason) for v in err.violations} == {
        ("rule.seller_id", "MISSING_FIELD"),
        ("rule.item_id", "MISSING_FIELD"),
        ("rule.crowd", "MISSING_FIELD"),
        ("rule.price", "MISSING_FIELD"),
    }
    assert "(and 3 more)" in err.message


def test_id_length_limit_comes_from_the_caller() -> None:
    validate(RuleIn, {**GOOD, "item_id": "x" * 200}, max_id_length=200)
    err = refused({**GOOD, "item_id": "x" * 11}, max_id_length=10)
    assert err.reason == "ID_TOO_LONG"


def test_batch_paths_and_bounds() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate(BatchIn, {"rules": [GOOD, {**GOOD, "item_id": ""}]})
    assert info.value.violations[0].field == "rules[1].item_id"
    with pytest.raises(InvalidArgumentError) as info:
        validate(BatchIn, {"rules": [GOOD] * 3}, max_rule_batch=2)
    assert info.value.reason == "BATCH_TOO_LARGE"
    with pytest.raises(InvalidArgumentError) as info:
        validate(BatchIn, {"rules": []})
    assert info.value.reason == "EMPTY_BATCH"


@pytest.mark.parametrize(
    ("value", "kind"),
    [(1, CrowdKind.ALL_FANS), ("old_fans", CrowdKind.OLD_FANS), (" PURCHASED_FANS ", CrowdKind.PURCHASED_FANS),
     ("CROWD_KIND_ALL_FANS", CrowdKind.ALL_FANS), (CrowdKind.OLD_FANS, CrowdKind.OLD_FANS)],
)  # fmt: skip
def test_crowd_names_and_numbers(value: object, kind: CrowdKind) -> None:
    assert parse_crowd(value) == kind


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [("18.88", "CNY", 1888), ("18.8", "CNY", 1880), ("18.8000", "CNY", 1880), ("18", "CNY", 1800),
     ("1999", "JPY", 1999), ("1.234", "KWD", 1234), (" 0.01 ", "USD", 1), ("1E+2", "USD", 10000)],
)  # fmt: skip
def test_decimal_prices_convert_exactly(text: str, currency: str, minor: int) -> None:
    assert decimal_to_minor(text, currency, "price") == minor


@pytest.mark.parametrize(
    ("text", "currency", "reason"),
    [("18.888", "CNY", "PRICE_TOO_PRECISE"), ("18.8", "JPY", "PRICE_TOO_PRECISE"),
     ("1.2345", "KWD", "PRICE_TOO_PRECISE"), ("NaN", "CNY", "INVALID_PRICE"),
     ("Infinity", "CNY", "INVALID_PRICE"), ("1,5", "EUR", "INVALID_PRICE"), ("", "EUR", "INVALID_PRICE"),
     (18.88, "CNY", "INVALID_PRICE"), ("1", "XXX", "UNKNOWN_CURRENCY")],
)  # fmt: skip
def test_decimal_prices_refused(text: object, currency: str, reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        decimal_to_minor(text, currency, "price")
    assert info.value.reason == reason


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(MINOR_UNITS)), st.integers(1, MAX_AMOUNT_MINOR))
def test_decimal_round_trip(currency: str, minor: int) -> None:
    text = minor_to_decimal(minor, currency)
    assert decimal_to_minor(text, currency, "price") == minor
    assert Decimal(text) * 10 ** MINOR_UNITS[currency] == minor


def test_times() -> None:
    assert parse_time("2030-01-01T00:00:00Z", "t") == 1893456000000
    assert parse_time("2030-01-01T08:00:00+08:00", "t") == 1893456000000
    assert parse_time(None, "t") is None and parse_time("", "t") is None
    for bad in ("2030-01-01T00:00:00", "tomorrow", "2030-13-01T00:00:00Z"):
        with pytest.raises(InvalidArgumentError) as info:
            parse_time(bad, "t")
        assert info.value.reason == "INVALID_TIME"


def test_human_rows() -> None:
    row = {
        "seller_id": "42",
        "item_id": "i",
        "crowd": "old_fans",
        "price": "2.5",
        "currency": "usd",
    }
    assert rule_from_human(row, "line 1").price == Money("USD", 250)
    with pytest.raises(InvalidArgumentError) as info:
        rule_from_human({**row, "price": ""}, "line 1")
    assert info.value.violations[0].field == "line 1.price"
    with pytest.raises(InvalidArgumentError) as info:
        rule_from_human({**row, "crowd": ""}, "line 7")
    assert (info.value.violations[0].field, info.value.reason) == (
        "line 7.crowd",
        "CROWD_KIND_UNSPECIFIED",
    )


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["rule_id", "seller_id", "item_id", "crowd", "price", "start_time", "end_time", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=5), st.booleans(), st.floats(),
                  st.dictionaries(st.sampled_from(["currency_code", "amount_minor"]),
                                  st.one_of(st.integers(), st.text(max_size=4)))),
    )
)  # fmt: skip
def test_arbitrary_input_is_accepted_or_refused_cleanly(data: dict[str, Any]) -> None:
    try:
        rule = validate(RuleIn, data, prefix="rule").to_domain()
    except InvalidArgumentError as exc:
        assert exc.violations
        assert all(v.field.startswith("rule") and v.reason.isupper() for v in exc.violations)
    else:
        assert rule.seller_id and rule.item_id and rule.price.amount_minor > 0


# --- page tokens --------------------------------------------------------------------------


@given(
    st.lists(st.one_of(st.text(max_size=20), st.integers(-(2**62), 2**62)), max_size=4),
    st.text(max_size=10),
    st.text(max_size=10),
)
def test_page_tokens_round_trip_and_are_bound_to_their_query(
    position: list[Any], seller: str, item: str
) -> None:
    token = encode_token(position, "rules", seller, item)
    assert decode_token(token, "rules", seller, item) == position
    with pytest.raises(InvalidArgumentError):
        decode_token(token, "rules", seller + "x", item)
    with pytest.raises(InvalidArgumentError):
        decode_token(token, "history", seller, item)


@given(st.text(max_size=60))
def test_any_text_is_a_valid_token_or_a_clean_refusal(token: str) -> None:
    try:
        decode_token(token, "rules", "42", "")
    except InvalidArgumentError as exc:
        assert exc.reason == "INVALID_PAGE_TOKEN"
