"""The hand-assembled BatchGetLowestPriceResponse equals protobuf's own serialisation.

The page path answers with memoised, serialised ``ItemPrice`` entries joined into the response
(``servicers.convert``); a client must not be able to tell: the bytes are compared with
``SerializeToString()`` of the same response built as a message, over generated responses.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pricing.v1 import common_pb2, pricing_pb2
from pricing_service.interceptors import passing_bytes
from pricing_service.servicers.convert import _varint, batch_response_bytes, price_entry

ids = st.text(max_size=200)  # any unicode, long enough for multi-byte lengths
item_prices = st.builds(
    lambda item, currency, amount, discounted, rule, crowd, seller: pricing_pb2.ItemPrice(
        item_id=item,
        price=common_pb2.Money(currency_code=currency, amount_minor=amount) if currency else None,
        discounted=discounted,
        rule_id=rule,
        crowd=crowd,
        seller_id=seller,
    ),
    ids,
    st.sampled_from(["", "CNY", "USD", "JPY"]),
    st.integers(0, 2**63 - 1),
    st.booleans(),
    ids,
    st.sampled_from([0, 1, 2, 3]),
    ids,
)


@given(
    st.lists(item_prices, max_size=30),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
)
def test_joined_entries_equal_the_serialised_message(
    prices: list[pricing_pb2.ItemPrice], degraded: bool, revision: int
) -> None:
    message = pricing_pb2.BatchGetLowestPriceResponse(
        prices=prices, degraded=degraded, rule_revision=revision
    )
    data = batch_response_bytes(
        [price_entry(p) for p in prices], degraded=degraded, rule_revision=revision
    )
    assert data == message.SerializeToString()
    assert pricing_pb2.BatchGetLowestPriceResponse.FromString(data) == message


def test_varint_edges() -> None:
    assert _varint(0) == b"\x00"
    assert _varint(127) == b"\x7f"
    assert _varint(128) == b"\x80\x01"
    assert _varint(300) == b"\xac\x02"
    assert _varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes


def test_the_method_serialiser_passes_bytes_and_serialises_messages() -> None:
    serialize = passing_bytes(pricing_pb2.BatchGetLowestPriceResponse.SerializeToString)
    assert serialize is not None
    message = pricing_pb2.BatchGetLowestPriceResponse(degraded=True, rule_revision=5)
    assert serialize(message) == message.SerializeToString()
    assert serialize(b"\x10\x01") == b"\x10\x01"
    assert passing_bytes(None) is None
