"""In-process cost of our code per BatchGetLowestPrice: everything but the gRPC transport.

``bench.serving`` measures the whole server under h2load; this isolates what we add on top of
the RPC itself, and measures CPU time (not wall time), so it stays meaningful on a busy host.
It loads the same data as ``bench.serving`` into a private ``redis-server`` and SQLite, opens
the real server (:class:`PricingServer`: rule index, membership store, breaker, metrics) and
calls the interceptor-wrapped servicer method directly with the real request message, N times,
sequentially: interceptor (request id, admission, canonical log line, metrics), proto ->
domain, rule index, one real ``HMGET`` round trip to Redis, the engine, domain -> proto, and
the response's serialisation by the method's serialiser.

    python -m bench.hotpath --batch 20 --calls 5000

The last line printed is one JSON object (``us_per_call`` = CPU µs per call, ``redis_us`` =
the share spent in the membership round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.serving import (
    BUYER,
    NAMESPACE,
    catalog,
    expected_answer,
    load_data,
    page,
    request_bytes,
)
from pricing_testing.redis_server import RedisServer


class _Context:
    """The parts of ``grpc.aio.ServicerContext`` the interceptor and servicer use."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float:
        return 2.0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


async def _measure(settings: Any, batch: int, calls: int) -> dict[str, Any]:
    from pricing.v1 import pricing_pb2  # noqa: PLC0415
    from pricing_service.interceptors import ServerInterceptor, passing_bytes  # noqa: PLC0415
    from pricing_service.server import PricingServer  # noqa: PLC0415
    from pricing_service.servicers.pricing import PricingServicer  # noqa: PLC0415

    items = page(catalog(), batch)
    expected = await expected_answer(settings, items)
    request = pricing_pb2.BatchGetLowestPriceRequest.FromString(request_bytes(items))
    async with PricingServer(settings, metrics_port=0) as server:
        assert server.core is not None
        servicer = PricingServicer(
            server.core, max_batch_items=settings.max_batch_items, max_id_length=128
        )
        interceptor = ServerInterceptor(server.metrics, max_concurrent_rpcs=1000)
        wrapped = interceptor._wrap(
            "/pricing.v1.PricingService/BatchGetLowestPrice", servicer.BatchGetLowestPrice
        )
        # the response serialised as the server's handler does (a message, or bytes passed on)
        serialize = passing_bytes(pricing_pb2.BatchGetLowestPriceResponse.SerializeToString)
        assert serialize is not None

        async def call(request: Any, ctx: Any) -> bytes:
            return serialize(await wrapped(request, ctx))

        ctx = _Context()
        response = pricing_pb2.BatchGetLowestPriceResponse.FromString(await call(request, ctx))
        got = [(p.item_id, p.price.amount_minor, p.rule_id) for p in response.prices]
        if got != expected or response.degraded:
            raise AssertionError(f"wrong answer: {got} != {expected}")
        membership = server.core.membership
        for _ in range(200):  # warm-up
            await call(request, ctx)
        samples: list[float] = []
        cpu0 = time.process_time()
        for _ in range(calls):
            t = time.process_time()
            await call(request, ctx)
            samples.append(time.process_time() - t)
        cpu = time.process_time() - cpu0
        # the membership round trip alone, same fields
        from pricing_service.engine import crowds_to_check  # noqa: PLC0415

        now = server.clock.now_ms()
        rule_lists = [r or () for r in server.core.index.lookup([i for i, _ in items])]
        wanted = crowds_to_check(rule_lists, now)
        r0 = time.process_time()
        for _ in range(calls):
            await membership.member_crowds(BUYER, wanted)
        redis_cpu = time.process_time() - r0
    return {
        "bench": "hotpath",
        "batch": batch,
        "calls": calls,
        "us_per_call": round(cpu / calls * 1e6, 1),
        "median_us": round(statistics.median(samples) * 1e6, 1),
        "redis_us": round(redis_cpu / calls * 1e6, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--crowds", choices=["builtin", "seller"], default="builtin",
                   help="the page's crowd mix (bench.crowd_mix)")  # fmt: skip
    args = p.parse_args(argv)
    from pricing_service.config import load_settings  # noqa: PLC0415
    from pricing_service.logging import configure_logging  # noqa: PLC0415

    # the canonical log line is part of the cost: rendered as in production, written to a sink
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    configure_logging("INFO", "json", stream=sink)
    with tempfile.TemporaryDirectory(prefix="bench-hotpath-") as tmp, RedisServer() as redis:
        settings = load_settings(
            redis_url=redis.url,
            redis_namespace=NAMESPACE,
            rule_store_url=f"sqlite:///{Path(tmp) / 'rules.db'}",
            listen="127.0.0.1:0",
        )
        asyncio.run(load_data(settings, catalog(), crowds=args.crowds))
        result = asyncio.run(_measure(settings, args.batch, args.calls))
        result["crowds"] = args.crowds
    print(
        f"batch {result['batch']}: {result['us_per_call']} µs CPU per call "
        f"(median {result['median_us']}), of which the membership round trip "
        f"{result['redis_us']} µs"
    )
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
