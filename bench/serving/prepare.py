"""Phase 1: the run's environment (the servers' and echoes' ``PRICING_*`` and ``OTEL_*``), its
settings and harness, and the data: a private ``redis-server`` and a SQLite rule store get
realistic data (``bench.serving_data``), each batch's request body and exact answer."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from bench.harness import Harness
from bench.serving.state import OTEL_MODES, Run
from bench.serving_data import (
    ITEMS_PER_SELLER,
    METHOD,
    NAMESPACE,
    OTHER_BUYERS,
    SELLERS,
    catalog,
    expected_answer,
    grpc_frame,
    load_data,
    page,
    request_bytes,
)
from pricing_testing.otlp import OtlpReceiver
from pricing_testing.redis_server import RedisServer


def new_run(
    args: argparse.Namespace,
    workdir: Path,
    redis: RedisServer,
    server_cpus: str | None,
    client_cpus: str | None,
    receiver: OtlpReceiver | None,
) -> Run:
    """The run's shared state: the processes' environment, the settings, the harness."""
    from pricing_service.config import load_settings  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRICING_", "OTEL_"))}
    env.update(otel_env(args.otel, receiver.endpoint if receiver else None))
    env.update(
        {
            "PRICING_REDIS_URL": redis.url,
            "PRICING_REDIS_NAMESPACE": NAMESPACE,
            "PRICING_RULE_STORE_URL": f"sqlite:///{workdir / 'rules.db'}",
            "PRICING_LOG_FORMAT": "json",
            "PRICING_LOG_LEVEL": "INFO",
        }
    )
    # the runtime's own knobs (PRICING_NATIVE_*) pass through to every server and echo
    env.update({k: v for k, v in os.environ.items() if k.startswith("PRICING_NATIVE_")})
    if args.membership_budget_ms is not None:
        env["PRICING_MEMBERSHIP_BUDGET_MS"] = str(args.membership_budget_ms)
    settings = load_settings(
        redis_url=redis.url,
        redis_namespace=NAMESPACE,
        rule_store_url=f"sqlite:///{workdir / 'rules.db'}",
    )
    harness = Harness(
        workdir, METHOD, args.clients, args.streams, args.duration, args.warmup, client_cpus
    )
    return Run(args, workdir, redis, harness, env, settings, catalog(), server_cpus)


def otel_env(mode: str, endpoint: str | None) -> dict[str, str]:
    """The servers' ``OTEL_*`` environment of ``--otel mode`` (none for ``off``), exporting to
    the OTLP/HTTP receiver at ``endpoint``."""
    sampler = OTEL_MODES[mode]
    if sampler is None or endpoint is None:
        return {}
    name, arg = sampler
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "bench-serving",
        "OTEL_TRACES_SAMPLER": name,
    }
    if arg:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    return env


def prepare(run: Run) -> None:
    t0 = time.monotonic()
    asyncio.run(load_data(run.settings, run.cat, crowds=getattr(run.args, "crowds", "builtin")))
    print(
        f"data loaded in {time.monotonic() - t0:.1f} s: {SELLERS * ITEMS_PER_SELLER * 3} rules, "
        f"{OTHER_BUYERS + 1} buyers",
        flush=True,
    )
    batches = [run.args.batch] + ([run.args.scaling_batch] if run.args.scaling_batch else [])
    for b in batches:
        items = page(run.cat, b)
        run.requests[b] = request_bytes(items)
        run.bodies[b] = run.workdir / f"request-{b}.bin"
        run.bodies[b].write_bytes(grpc_frame(run.requests[b]))
        run.expected[b] = asyncio.run(expected_answer(run.settings, items))
