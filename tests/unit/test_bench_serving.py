"""The serving benchmark's own arithmetic and checks (no I/O): a wrong harness is a wrong figure."""

from __future__ import annotations

import math
import struct

import pytest

from bench import serving
from bench.echo_server import synthetic_response
from pricing.v1 import pricing_pb2


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert serving.percentile(values, 50) == 50
    assert serving.percentile(values, 99) == 99
    assert serving.percentile(values, 100) == 100
    assert serving.percentile(values, 0) == 1
    assert serving.percentile([7], 99) == 7
    # 10 samples: p99 is the largest, p50 the 5th
    ten = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000]
    assert serving.percentile(ten, 99) == 1000
    assert serving.percentile(ten, 50) == 50


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(serving.percentile([], 99))


def test_grpc_frame_is_length_prefixed_uncompressed() -> None:
    msg = serving.request_bytes([("1", 100)])
    frame = serving.grpc_frame(msg)
    assert frame[0] == 0  # not compressed
    assert struct.unpack(">I", frame[1:5])[0] == len(msg)
    parsed = pricing_pb2.BatchGetLowestPriceRequest.FromString(frame[5:])
    assert parsed.user_id == serving.BUYER
    assert parsed.items[0].list_price.amount_minor == 100


def test_page_spreads_items_over_ten_sellers() -> None:
    cat = serving.catalog()
    for batch in (20, 100):
        items = serving.page(cat, batch)
        assert len(items) == batch
        assert len({i for i, _ in items}) == batch
        sellers = {s for s in cat.sellers for i, _ in items if i in cat.items[s]}
        assert sellers == set(cat.page_sellers)
        assert all(lp == cat.list_price[i] for i, lp in items)
    with pytest.raises(SystemExit):
        serving.page(cat, serving.PAGE_SELLERS * serving.ITEMS_PER_SELLER + 1)


def _response(prices: list[tuple[str, int, str]], *, degraded: bool = False) -> bytes:
    r = pricing_pb2.BatchGetLowestPriceResponse(degraded=degraded)
    for item, amount, rule in prices:
        p = r.prices.add(item_id=item, rule_id=rule, discounted=bool(rule))
        p.price.currency_code = "CNY"
        p.price.amount_minor = amount
    data: bytes = r.SerializeToString()
    return data


def test_check_answer_accepts_the_expected_page() -> None:
    expected = [("a", 100, "r1"), ("b", 200, "")]
    assert serving.check_answer(_response(expected), expected) == 1


def test_check_answer_refuses_degraded_wrong_or_unrealistic_pages() -> None:
    expected = [("a", 100, "r1"), ("b", 200, "")]
    with pytest.raises(AssertionError, match="degraded"):
        serving.check_answer(_response(expected, degraded=True), expected)
    with pytest.raises(AssertionError, match="wrong answer"):
        serving.check_answer(_response([("a", 101, "r1"), ("b", 200, "")]), expected)
    with pytest.raises(AssertionError, match="wrong answer"):
        serving.check_answer(_response([("b", 200, ""), ("a", 100, "r1")]), expected)
    nothing = [("a", 100, ""), ("b", 200, "")]
    with pytest.raises(AssertionError, match="not a realistic page"):
        serving.check_answer(_response(nothing), nothing)


def test_synthetic_echo_response_has_the_page_shape() -> None:
    r = synthetic_response(20)
    assert len(r.prices) == 20
    assert sum(p.discounted for p in r.prices) == 10
    assert not r.degraded


def test_median_of_round_ratios_skips_unknowns() -> None:
    from bench.serving import _median  # noqa: PLC0415

    assert _median([0.5, None, 0.7, 0.6]) == 0.6
    assert _median([0.5, 0.6]) == 0.55
    assert _median([None, None]) is None
    assert _median([]) is None


def test_rounds_must_be_positive() -> None:
    import pytest  # noqa: PLC0415

    from bench.serving import main  # noqa: PLC0415

    with pytest.raises(SystemExit):
        main(["--rounds", "0"])


def test_thread_delta_splits_kernel_time_per_request() -> None:
    from bench.harness import thread_delta  # noqa: PLC0415

    before = {"loop": [1.0, 0.5, 10.0, 2.0, 0.2], "idle": [0.5, 0.0, 0.0, 0.0, 0.0]}
    after = {"loop": [3.0, 1.5, 30.0, 12.0, 0.6], "idle": [0.505, 0.0, 0.0, 0.0, 0.0]}
    out = thread_delta(before, after, 1000)
    assert out == {
        "loop": {
            "cpu_us": 2000.0,
            "sys_us": 400.0,
            "runq_wait_us": 1000.0,
            "switches": 0.03,
            "preempted": 0.01,
        }
    }  # a thread that ran under 10 ms over the point is left out
