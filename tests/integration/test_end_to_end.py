"""The whole system through its real processes: pricing-service, sync-worker, Redis, SQLite.

A fan sees the fan price, a stranger the list price; an unfollow published to the stream
changes the fan's answer within a second; bad input gets INVALID_ARGUMENT naming the field and
neither process crashes.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_testing.procs import Proc, run_sync_worker

# every test starts a server: on each server runtime (tests.conftest.server_runtime)
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_runtime")]
ADMIN = (("authorization", "Bearer test-admin-token"),)


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def write_snapshot(
    directory: Path, cut: datetime, rows: list[tuple[str, str, datetime, int]]
) -> None:
    directory.mkdir()
    with (directory / "part-00000.csv").open("w") as f:
        f.write("user_id,seller_id,followed_at,purchase_count\n")
        for user, seller, followed, count in rows:
            f.write(f"{user},{seller},{rfc3339(followed)},{count}\n")
    manifest = {"snapshot_time": rfc3339(cut), "files": ["part-00000.csv"], "rows": len(rows)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def money(amount: int, currency: str = "CNY") -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, amount_minor=amount)


def price_of(stub: pricing_pb2_grpc.PricingServiceStub, user: str) -> pricing_pb2.ItemPrice:
    response = stub.BatchGetLowestPrice(
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id=user, items=[pricing_pb2.PriceQuery(item_id="1001", list_price=money(2500))]
        ),
        timeout=5,
    )
    assert not response.degraded
    assert len(response.prices) == 1
    return response.prices[0]


def test_fan_price_stranger_price_and_unfollow_within_a_second(
    system: tuple[dict[str, str], Proc, Proc], tmp_path: Path
) -> None:
    env, server, worker = system
    target = env["PRICING_LISTEN"]
    now = datetime.now(UTC)
    write_snapshot(
        tmp_path / "snap",
        now - timedelta(minutes=5),
        [("fan1", "42", now - timedelta(days=60), 2), ("fan2", "42", now - timedelta(days=2), 0)],
    )
    loaded = run_sync_worker(env, "load-snapshot", str(tmp_path / "snap"))
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr

    with grpc.insecure_channel(target) as channel:
        admin = admin_pb2_grpc.DiscountAdminServiceStub(channel)
        rule = admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(
                rule=admin_pb2.DiscountRule(
                    seller_id="42",
                    item_id="1001",
                    crowd=common_pb2.CROWD_KIND_ALL_FANS,
                    price=money(1888),
                )
            ),
            metadata=ADMIN,
            timeout=5,
        ).rule
        assert rule.rule_id and rule.revision >= 1
        stub = pricing_pb2_grpc.PricingServiceStub(channel)

        deadline = time.monotonic() + 5  # the index refreshes every 100 ms here
        fan = price_of(stub, "fan1")
        while not fan.discounted and time.monotonic() < deadline:
            time.sleep(0.05)
            fan = price_of(stub, "fan1")
        assert fan.discounted, server.log()
        assert (fan.price.currency_code, fan.price.amount_minor) == ("CNY", 1888)
        assert fan.rule_id == rule.rule_id
        assert fan.crowd == common_pb2.CROWD_KIND_ALL_FANS

        stranger = price_of(stub, "stranger")
        assert not stranger.discounted
        assert stranger.price.amount_minor == 2500

        anonymous = price_of(stub, "")
        assert not anonymous.discounted and anonymous.price.amount_minor == 2500

        # checkout agrees, strictly, once the worker's watermark is fresh
        strict = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                strict = stub.CheckDiscountStrict(
                    pricing_pb2.CheckDiscountStrictRequest(user_id="fan1", item_id="1001"),
                    timeout=5,
                )
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                time.sleep(0.1)
        assert strict is not None and strict.verdict == pricing_pb2.VERDICT_ELIGIBLE, worker.log()
        assert strict.eligible and strict.price.amount_minor == 1888

        published = run_sync_worker(
            env, "publish", "--type", "unfollow", "--user", "fan1", "--seller", "42"
        )
        assert published.returncode == 0, published.stdout + published.stderr
        start = time.monotonic()
        while price_of(stub, "fan1").discounted:
            assert time.monotonic() - start < 1.0, (
                "unfollow not visible within a second:\n" + worker.log()
            )
            time.sleep(0.01)
        after = price_of(stub, "fan1")
        assert after.price.amount_minor == 2500
        assert price_of(stub, "fan2").discounted  # other fans unaffected

        strict = stub.CheckDiscountStrict(
            pricing_pb2.CheckDiscountStrictRequest(user_id="fan1", item_id="1001"), timeout=5
        )
        assert strict.verdict == pricing_pb2.VERDICT_NOT_IN_CROWD and not strict.eligible


BAD_REQUESTS = [
    (pricing_pb2.BatchGetLowestPriceRequest(user_id="u"), "items", "EMPTY_BATCH"),
    (
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id="u", items=[pricing_pb2.PriceQuery(item_id=str(i)) for i in range(201)]
        ),
        "items",
        "BATCH_TOO_LARGE",
    ),
    (
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id="u", items=[pricing_pb2.PriceQuery(item_id="")]
        ),
        "items[0].item_id",
        "MISSING_ID",
    ),
    (
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id="u",
            items=[
                pricing_pb2.PriceQuery(item_id="a"),
                pricing_pb2.PriceQuery(item_id="b", list_price=money(-5)),
            ],
        ),
        "items[1].list_price.amount_minor",
        "NEGATIVE_PRICE",
    ),
    (
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id="u",
            items=[pricing_pb2.PriceQuery(item_id="1001", list_price=money(2500, "USD"))],
        ),
        "items[0].list_price.currency_code",
        "CURRENCY_MISMATCH",
    ),
    (
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id="u",
            items=[pricing_pb2.PriceQuery(item_id="1001", list_price=money(2500, "XXQ"))],
        ),
        "items[0].list_price.currency_code",
        "UNKNOWN_CURRENCY",
    ),
]


def test_bad_input_gets_invalid_argument_naming_the_field(
    system: tuple[dict[str, str], Proc, Proc],
) -> None:
    env, server, worker = system
    with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
        admin = admin_pb2_grpc.DiscountAdminServiceStub(channel)
        admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(
                rule=admin_pb2.DiscountRule(
                    seller_id="42",
                    item_id="1001",
                    crowd=common_pb2.CROWD_KIND_ALL_FANS,
                    price=money(1888),
                )
            ),
            metadata=ADMIN,
            timeout=5,
        )
        time.sleep(0.5)  # let the index pick the rule up (currency check needs it)
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        for request, field, reason in BAD_REQUESTS:
            with pytest.raises(grpc.RpcError) as caught:
                stub.BatchGetLowestPrice(request, timeout=5)
            err = caught.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.details())
            status = rpc_status.from_call(err)
            assert status is not None
            violations = []
            reasons = []
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    detail.Unpack(br)
                    violations += [v.field for v in br.field_violations]
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reasons.append(info.reason)
            assert violations == [field]
            assert reasons == [reason]
        for strict in (
            pricing_pb2.CheckDiscountStrictRequest(user_id="", item_id="1001"),
            pricing_pb2.CheckDiscountStrictRequest(user_id="u", item_id="x" * 1000),
            pricing_pb2.CheckDiscountStrictRequest(
                user_id="u", item_id="1001", expected_price=money(5, "")
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.CheckDiscountStrict(strict, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.alive() and worker.alive()
