"""Proto <-> domain conversions shared by the servicers, with request validation."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from pricing.v1 import common_pb2, pricing_pb2
from pricing_service.currency import MAX_AMOUNT_MINOR, is_known
from pricing_service.domain import Money
from pricing_service.errors import InvalidArgumentError


def money_from_proto(m: common_pb2.Money, field: str, *, allow_zero: bool) -> Money:
    code = m.currency_code
    if not is_known(code):
        raise InvalidArgumentError.field(
            field + ".currency_code",
            f"{code!r} is not an ISO-4217 currency code" if code else "must not be empty",
            "UNKNOWN_CURRENCY",
        )
    amount = m.amount_minor
    if amount < 0 or (amount == 0 and not allow_zero):
        raise InvalidArgumentError.field(
            field + ".amount_minor",
            f"must be {'>= 0' if allow_zero else '> 0'}, got {amount}",
            "NEGATIVE_PRICE" if amount < 0 else "ZERO_PRICE",
        )
    if amount > MAX_AMOUNT_MINOR:
        raise InvalidArgumentError.field(
            field + ".amount_minor", f"must be at most {MAX_AMOUNT_MINOR}", "PRICE_TOO_LARGE"
        )
    return Money(code, amount)


def money_to_proto(m: Money, out: common_pb2.Money) -> None:
    out.currency_code = m.currency
    out.amount_minor = m.amount_minor


#: The range of ``google.protobuf.Timestamp`` (0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z).
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
MAX_NANOS = 999_999_999


def timestamp_to_ms(ts: Timestamp, field: str) -> int:
    """UTC milliseconds of a request's Timestamp, refusing one outside the protobuf spec.

    ``nanos`` must be 0..999,999,999 and ``seconds`` within years 1..9999: anything else is no
    instant (``{S, nanos: -1}`` would otherwise be read as S - 1 ms), refused with the field
    (``rule.end_time.nanos``) named.
    """
    if not 0 <= ts.nanos <= MAX_NANOS:
        raise InvalidArgumentError.field(
            field + ".nanos",
            f"must be between 0 and {MAX_NANOS}, got {ts.nanos}",
            "INVALID_TIMESTAMP",
        )
    if not TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS:
        raise InvalidArgumentError.field(
            field + ".seconds",
            f"must be within 0001-01-01 and 9999-12-31 ({TIMESTAMP_MIN_SECONDS}.."
            f"{TIMESTAMP_MAX_SECONDS}), got {ts.seconds}",
            "INVALID_TIMESTAMP",
        )
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def ms_to_timestamp(ms: int, out: Timestamp) -> None:
    out.seconds, millis = divmod(ms, 1000)
    out.nanos = millis * 1_000_000


# --- BatchGetLowestPriceResponse as bytes ----------------------------------------------------
# A response without explanations is built from memoised, already serialised ItemPrice entries:
# joining them costs less than copying 20 messages into the response and serialising them again
# (bench.hotpath). The wire format of the three fields (protobuf encoding, stable by contract):
# ``prices = 1`` (length-delimited, tag 0x0A), ``degraded = 2`` (varint, tag 0x10),
# ``rule_revision = 3`` (varint, tag 0x18), written in field order as protobuf's own serialiser
# does, so the bytes equal ``BatchGetLowestPriceResponse.SerializeToString()`` (tested).


def _varint(n: int) -> bytes:
    """A protobuf varint; a negative int64 as its 64-bit two's complement (10 bytes)."""
    n &= 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def price_entry(price: pricing_pb2.ItemPrice) -> bytes:
    """One element of ``BatchGetLowestPriceResponse.prices``, serialised with its tag."""
    body = price.SerializeToString()
    return b"\x0a" + _varint(len(body)) + body


def batch_response_bytes(entries: Sequence[bytes], *, degraded: bool, rule_revision: int) -> bytes:
    """A serialised ``BatchGetLowestPriceResponse`` from :func:`price_entry` results."""
    tail = (b"\x10\x01" if degraded else b"") + (
        b"\x18" + _varint(rule_revision) if rule_revision else b""
    )
    return b"".join(entries) + tail
