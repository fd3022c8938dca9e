"""The echo baseline of ``bench.serving``: a no-op PricingService on the same gRPC stack.

It answers ``BatchGetLowestPrice`` with one pre-built response (the real server's answer to the
benchmark's page, read from ``--response FILE``, or a synthetic one of ``--batch`` items), after
the same request deserialisation and response serialisation as the real server. Same process
model as ``pricing-service serve``: ``--workers`` processes forked before any gRPC object
exists, sharing one port through ``SO_REUSEPORT``, with the same server options.

    python -m bench.echo_server --listen 127.0.0.1:50099 --workers 2 --response resp.bin
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pricing_service.workers import fork_workers  # no gRPC in it: safe before fork

if TYPE_CHECKING:
    from pricing.v1 import pricing_pb2

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the pricing server's default PRICING_MAX_MESSAGE_BYTES


def synthetic_response(batch: int) -> pricing_pb2.BatchGetLowestPriceResponse:
    """A response shaped like a real page: every other item discounted by a fan rule."""
    from pricing.v1 import pricing_pb2  # noqa: PLC0415 - no gRPC/protobuf before fork

    response = pricing_pb2.BatchGetLowestPriceResponse(degraded=False, rule_revision=6000)
    for i in range(batch):
        out = response.prices.add(item_id=f"{100_000 + i}")
        out.price.currency_code = "CNY"
        out.price.amount_minor = 12_900 - (1000 if i % 2 else 0)
        if i % 2:
            out.discounted = True
            out.rule_id = f"{i:032x}"
            out.crowd = 1  # type: ignore[assignment]
            out.seller_id = f"{1000 + i // 2}"
    return response


async def _serve(listen: str, response_bytes: bytes | None, batch: int) -> int:
    import grpc  # noqa: PLC0415

    from pricing.v1 import pricing_pb2, pricing_pb2_grpc  # noqa: PLC0415

    if response_bytes is not None:
        prebuilt = pricing_pb2.BatchGetLowestPriceResponse.FromString(response_bytes)
    else:
        prebuilt = synthetic_response(batch)

    class EchoServicer(pricing_pb2_grpc.PricingServiceServicer):
        async def BatchGetLowestPrice(
            self,
            request: pricing_pb2.BatchGetLowestPriceRequest,
            context: grpc.aio.ServicerContext,
        ) -> pricing_pb2.BatchGetLowestPriceResponse:
            return prebuilt

        async def CheckDiscountStrict(
            self,
            request: pricing_pb2.CheckDiscountStrictRequest,
            context: grpc.aio.ServicerContext,
        ) -> pricing_pb2.CheckDiscountStrictResponse:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server only batches")
            raise AssertionError("unreachable")  # abort raises

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1),
        ]
    )
    pricing_pb2_grpc.add_PricingServiceServicer_to_server(EchoServicer(), server)
    if server.add_insecure_port(listen) == 0:
        print(f"echo_server: cannot listen on {listen}", file=sys.stderr)
        return 1
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    return 0


def serve(listen: str, workers: int, response_bytes: bytes | None, batch: int) -> int:
    """Run ``workers`` processes on ``listen`` (forked before gRPC starts, like the server)."""
    if workers <= 1:
        return asyncio.run(_serve(listen, response_bytes, batch))
    return fork_workers(workers, lambda _i: asyncio.run(_serve(listen, response_bytes, batch)))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--response", default=None, help="file holding a serialized response")
    p.add_argument("--batch", type=int, default=20, help="items of the synthetic response")
    args = p.parse_args(argv)
    response_bytes = None
    if args.response:
        with open(args.response, "rb") as f:
            response_bytes = f.read()
    sys.exit(serve(args.listen, args.workers, response_bytes, args.batch))


if __name__ == "__main__":
    main()
