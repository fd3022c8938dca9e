"""Blocking gRPC calls the process-level tests share (the admin token of ``service_env``)."""

from __future__ import annotations

import grpc

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pricing_pb2, pricing_pb2_grpc

ADMIN = (("authorization", "Bearer test-admin-token"),)


def upsert_fan_rule(
    channel: grpc.Channel, amount: int, *, seller: str = "42", item: str = "1001"
) -> admin_pb2.DiscountRule:
    """An all-fans rule: ``item`` of ``seller`` at ``amount`` CNY minor units."""
    response = admin_pb2_grpc.DiscountAdminServiceStub(channel).UpsertDiscountRule(
        admin_pb2.UpsertDiscountRuleRequest(
            rule=admin_pb2.DiscountRule(
                seller_id=seller,
                item_id=item,
                crowd=common_pb2.CROWD_KIND_ALL_FANS,
                price=common_pb2.Money(currency_code="CNY", amount_minor=amount),
            )
        ),
        metadata=ADMIN,
        timeout=5,
    )
    rule: admin_pb2.DiscountRule = response.rule
    return rule


def strict_verdict(stub: pricing_pb2_grpc.PricingServiceStub, user: str, item: str = "1001") -> int:
    """The verdict of CheckDiscountStrict, or -1 when it refused (UNAVAILABLE)."""
    try:
        r = stub.CheckDiscountStrict(
            pricing_pb2.CheckDiscountStrictRequest(user_id=user, item_id=item), timeout=5
        )
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return -1
    return int(r.verdict)
