"""Human CLI for a running server: ``pricing-service price`` and ``pricing-service check``."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import json_format

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.config import Settings
from pricing_service.rules.validation import decimal_to_minor


def run(settings: Settings, args: argparse.Namespace) -> int:
    target = args.target or settings.listen
    with grpc.insecure_channel(target) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        try:
            if args.command == "price":
                request = pricing_pb2.BatchGetLowestPriceRequest(
                    user_id=args.user, explain=args.explain
                )
                for token in filter(None, (t.strip() for t in args.items.split(","))):
                    item, _, list_price = token.partition("=")
                    q = request.items.add(item_id=item)
                    if list_price:
                        q.list_price.CopyFrom(
                            common_pb2.Money(
                                currency_code=args.currency,
                                amount_minor=decimal_to_minor(list_price, args.currency, "items"),
                            )
                        )
                response: object = stub.BatchGetLowestPrice(request, timeout=5)
            else:
                check = pricing_pb2.CheckDiscountStrictRequest(user_id=args.user, item_id=args.item)
                if args.expected_price:
                    check.expected_price.CopyFrom(
                        common_pb2.Money(
                            currency_code=args.currency,
                            amount_minor=decimal_to_minor(
                                args.expected_price, args.currency, "expected_price"
                            ),
                        )
                    )
                response = stub.CheckDiscountStrict(check, timeout=5)
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(json.dumps(json_format.MessageToDict(response), indent=2))  # type: ignore[arg-type]
    return 0
