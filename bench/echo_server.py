"""The echo baseline of ``bench.serving``: a no-op PricingService on the same gRPC runtime.

It answers ``BatchGetLowestPrice`` with one pre-built response (the real server's answer to the
benchmark's page, read from ``--response FILE``, or a synthetic one of ``--batch`` items), after
the same request deserialisation and response serialisation as the real server. Same process
model as ``pricing-service serve``: ``--workers`` processes forked before any gRPC object
exists, sharing one port through ``SO_REUSEPORT``, with the same server options, on the same
server runtime (``--runtime``, else ``PRICING_SERVER_RUNTIME``: ``pricing_service.runtime``),
serving the handler bare (no pipeline: no request id, admission or log line).

    python -m bench.echo_server --listen 127.0.0.1:50099 --workers 2 --response resp.bin

With ``--floor-redis URL --floor-key KEY --floor-fields F,F,...`` it is the *floor* instead: the
same pre-built answer, after only what the design makes every real answer pay besides gRPC —
one ``HMGET`` of the page's crowd fields through the serving path's pipelined Redis reader,
under a budget, and the canonical JSON ``rpc_finished`` line per RPC through the server's own
structlog configuration (request id, method, code, duration). No interceptor, no rule index, no
pricing. ``bench.serving --floor`` measures it beside the echo: the rate a server doing nothing
but those two things reaches bounds what ``ratio_to_echo`` any pricing code can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


@dataclass(frozen=True)
class Floor:
    """What the floor server reads per request (see the module docstring)."""

    redis_url: str
    key: str
    fields: tuple[str, ...]


async def _serve(
    listen: str,
    response_bytes: bytes | None,
    batch: int,
    floor: Floor | None,
    runtime_args: dict[str, Any],
) -> int:
    import grpc  # noqa: PLC0415

    from pricing.v1 import pricing_pb2, pricing_pb2_grpc  # noqa: PLC0415

    if response_bytes is not None:
        prebuilt = pricing_pb2.BatchGetLowestPriceResponse.FromString(response_bytes)
    else:
        prebuilt = synthetic_response(batch)
    answer: Callable[[grpc.aio.ServicerContext], Awaitable[None]] | None = None
    if floor is not None:
        answer = await _floor_work(floor)

    class EchoServicer(pricing_pb2_grpc.PricingServiceServicer):
        async def BatchGetLowestPrice(
            self,
            request: pricing_pb2.BatchGetLowestPriceRequest,
            context: grpc.aio.ServicerContext,
        ) -> pricing_pb2.BatchGetLowestPriceResponse:
            if answer is not None:
                await answer(context)
            return prebuilt

        async def CheckDiscountStrict(
            self,
            request: pricing_pb2.CheckDiscountStrictRequest,
            context: grpc.aio.ServicerContext,
        ) -> pricing_pb2.CheckDiscountStrictResponse:
            raise NotImplementedError("the echo server only batches")

    from pricing_service.config import load_settings  # noqa: PLC0415
    from pricing_service.runtime import MethodTable, ServerParts, select_runtime  # noqa: PLC0415

    # the server's own runtime, options and process model, without the pipeline (bare handlers)
    settings = load_settings(listen=listen, max_message_bytes=MAX_MESSAGE_BYTES, **runtime_args)
    methods = MethodTable()
    pricing_pb2_grpc.add_PricingServiceServicer_to_server(EchoServicer(), methods)
    try:
        server = select_runtime(settings).build(
            ServerParts(
                settings=settings,
                pipeline=None,
                methods=methods,
                add_grpcio_services=lambda _server: None,
                grpc_options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.so_reuseport", 1),
                ],
            )
        )
    except OSError as exc:
        print(f"echo_server: {exc}", file=sys.stderr)
        return 1
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    return 0


async def _floor_work(floor: Floor) -> Callable[[Any], Awaitable[None]]:
    """The floor's per-request work: one budgeted HMGET and the canonical log line."""
    import redis.asyncio as aioredis  # noqa: PLC0415
    import structlog  # noqa: PLC0415

    from pricing_service.logging import configure_logging  # noqa: PLC0415
    from pricing_service.redis_pipe import PipelinedReader  # noqa: PLC0415

    configure_logging("INFO", "json")
    log = structlog.get_logger("pricing_service.rpc")
    client = aioredis.Redis.from_url(
        floor.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    reader = PipelinedReader.from_client(client)
    key, fields = floor.key, floor.fields

    async def work(context: Any) -> None:
        start = time.perf_counter()
        async with asyncio.timeout(0.05):
            values = await reader.hmget(key, fields)
        if all(v is None for v in values):
            raise RuntimeError("the floor's buyer has no membership in Redis")
        log.info(
            "rpc_finished",
            method="/pricing.v1.PricingService/BatchGetLowestPrice",
            code="OK",
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
            request_id=os.urandom(16).hex(),
        )

    return work


def serve(
    listen: str,
    workers: int,
    response_bytes: bytes | None,
    batch: int,
    floor: Floor | None = None,
    runtime_args: dict[str, Any] | None = None,
) -> int:
    """Run ``workers`` processes on ``listen`` (forked before gRPC starts, like the server);
    ``runtime_args``: settings of the runtime (``server_runtime``, ``native_pump``, ...), else
    the ``PRICING_*`` environment's."""
    args = runtime_args or {}
    if workers <= 1:
        return asyncio.run(_serve(listen, response_bytes, batch, floor, args))
    return fork_workers(
        workers, lambda _i: asyncio.run(_serve(listen, response_bytes, batch, floor, args))
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--response", default=None, help="file holding a serialized response")
    p.add_argument("--batch", type=int, default=20, help="items of the synthetic response")
    p.add_argument("--floor-redis", default=None, help="Redis URL: serve as the floor")
    p.add_argument("--floor-key", default="", help="the floor's buyer hash")
    p.add_argument("--floor-fields", default="", help="the floor's HMGET fields, comma-separated")
    p.add_argument(
        "--runtime", default=None, help="server runtime (default: PRICING_SERVER_RUNTIME's)"
    )
    args = p.parse_args(argv)
    floor = None
    if args.floor_redis:
        fields = tuple(f for f in args.floor_fields.split(",") if f)
        if not args.floor_key or not fields:
            p.error("--floor-redis needs --floor-key and --floor-fields")
        floor = Floor(args.floor_redis, args.floor_key, fields)
    response_bytes = None
    if args.response:
        with open(args.response, "rb") as f:
            response_bytes = f.read()
    runtime_args = {"server_runtime": args.runtime} if args.runtime else {}
    sys.exit(serve(args.listen, args.workers, response_bytes, args.batch, floor, runtime_args))


if __name__ == "__main__":
    main()
