"""``pricing-service``: serve, migrate, manage rules, and query prices from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import structlog

from pricing_service.client_flags import add_client_flags
from pricing_service.config import Settings, load_settings
from pricing_service.errors import ConfigError, PricingError
from pricing_service.logging import configure_logging
from pricing_service.otel_config import OtelSettings, load_otel_settings
from pricing_service.runtime import select_runtime
from pricing_service.workers import fork_workers

log = structlog.get_logger("pricing_service")

#: The health service name of the liveness probe (deploy/kubernetes/server.yaml): SERVING from
#: start-up (rule index loaded, port open) to shutdown, independent of Redis; the overall
#: status and the services' names follow Redis too (readiness).
LIVENESS_SERVICE = "liveness"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pricing-service",
        description="Crowd pricing gRPC service. Configuration: PRICING_* environment variables.",
    )
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gRPC server (default)")
    serve.add_argument("--workers", type=int, default=None, help="processes sharing the port")
    serve.add_argument("--listen", default=None, help="override PRICING_LISTEN")
    sub.add_parser("migrate", help="apply rule store schema migrations and exit")

    rules = sub.add_parser(
        "rules",
        help="manage discount rules: in the rule store (PRICING_RULE_STORE_URL), or with "
        "--target through a running server's admin API (PRICING_ADMIN_TOKEN)",
    )
    rsub = rules.add_subparsers(dest="rules_command", required=True)
    imp = rsub.add_parser("import", help="upsert rules from a JSON-lines or CSV file, atomically")
    imp.add_argument("file")
    imp.add_argument("--actor", default="cli")
    up = rsub.add_parser("upsert", help="create or replace the rule of (item, crowd)")
    up.add_argument("--seller", required=True)
    up.add_argument("--item", required=True)
    up.add_argument(
        "--crowd",
        required=True,
        help="all_fans, old_fans, purchased_fans, or the id of one of the seller's crowds",
    )
    up.add_argument("--price", required=True, help="decimal, e.g. 18.88")
    up.add_argument("--currency", required=True)
    up.add_argument("--start", default=None, help="RFC 3339 start time")
    up.add_argument("--end", default=None, help="RFC 3339 end time")
    up.add_argument("--actor", default="cli")
    ls = rsub.add_parser("list", help="list rules by seller and/or item")
    ls.add_argument("--seller", default="")
    ls.add_argument("--item", default="")
    for cmd in (imp, up, ls):
        add_client_flags(cmd)

    crowds = sub.add_parser("crowds", help="manage a seller's crowds in the rule store")
    csub = crowds.add_subparsers(dest="crowds_command", required=True)
    cc = csub.add_parser("create", help="define a crowd: a predicate (the options) or --list")
    cc.add_argument("--seller", required=True)
    cc.add_argument("--id", required=True, dest="crowd_id")
    cc.add_argument("--name", default="", help="display name")
    cc.add_argument("--min-follow-days", type=int, default=None)
    cc.add_argument("--max-follow-days", type=int, default=None)
    cc.add_argument("--min-purchases", type=int, default=None)
    cc.add_argument("--purchased-within-days", type=int, default=None)
    cc.add_argument("--list", action="store_true", help="an explicit list of buyers")
    cc.add_argument("--actor", default="cli")
    for name, what in (("get", "read one crowd"), ("delete", "delete a crowd no rule uses")):
        c = csub.add_parser(name, help=what)
        c.add_argument("--seller", required=True)
        c.add_argument("--id", required=True, dest="crowd_id")
        c.add_argument("--actor", default="cli")
    cl = csub.add_parser("list", help="a seller's crowds")
    cl.add_argument("--seller", required=True)
    ch = csub.add_parser("history", help="a seller's crowd changes, newest first")
    ch.add_argument("--seller", required=True)
    for name, what in (("add", "add buyers to a list crowd"), ("remove", "remove buyers")):
        c = csub.add_parser(name, help=f"{what} (bigger lists: sync-worker load-list)")
        c.add_argument("--seller", required=True)
        c.add_argument("--id", required=True, dest="crowd_id")
        c.add_argument("--users", required=True, help="comma-separated buyer ids")
        c.add_argument("--actor", default="cli")

    price = sub.add_parser("price", help="ask a running server for a buyer's prices")
    price.add_argument("--user", default="", help="buyer id (empty = anonymous)")
    price.add_argument(
        "--items", required=True, help="comma-separated item ids, each optionally ITEM=LIST_PRICE"
    )
    price.add_argument("--currency", default="CNY", help="currency of list prices")
    price.add_argument("--explain", action="store_true")
    add_client_flags(price)
    check = sub.add_parser("check", help="ask a running server for a strict checkout decision")
    check.add_argument("--user", required=True)
    check.add_argument("--item", required=True)
    check.add_argument("--expected-price", default=None, help="decimal, e.g. 18.88")
    check.add_argument("--currency", default="CNY")
    add_client_flags(check)
    health = sub.add_parser(
        "health",
        help="print the health of a running server's services; exit 1 unless all are SERVING",
    )
    health.add_argument(
        "--service",
        action="append",
        default=None,
        help="a service name to check (repeatable; default: overall, PricingService, "
        "DiscountAdminService)",
    )
    add_client_flags(health)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        overrides: dict[str, object] = {}
        if getattr(args, "listen", None):
            overrides["listen"] = args.listen
        if getattr(args, "workers", None):
            overrides["workers"] = args.workers
        settings = load_settings(**overrides)
    except ConfigError as exc:
        print(f"pricing-service: {exc.message}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format)
    command = args.command or "serve"
    try:
        if command == "serve":
            try:
                # the runtime can serve this configuration (TLS, say): checked before forking
                select_runtime(settings)
                otel = load_otel_settings()  # tracing (OTEL_*): off unless an exporter is set
            except ConfigError as exc:
                print(f"pricing-service: {exc.message}", file=sys.stderr)
                sys.exit(2)
            sys.exit(serve(settings, otel))
        elif command == "migrate":
            import pricing_service.rules.cli as rules_cli  # noqa: PLC0415

            sys.exit(asyncio.run(rules_cli.migrate(settings)))
        elif command == "rules":
            sys.exit(asyncio.run(_rules(settings, args)))
        elif command == "crowds":
            sys.exit(asyncio.run(_crowds(settings, args)))
        elif command in ("price", "check"):
            from pricing_service import client_cli  # noqa: PLC0415

            sys.exit(client_cli.run(settings, args))
        elif command == "health":
            from pricing_service import client_cli  # noqa: PLC0415

            sys.exit(client_cli.health(settings, args))
    except PricingError as exc:
        if command == "serve":  # a log line like every other line of the server (JSON)
            log.error("server_failed", reason=exc.reason, message=exc.message)  # noqa: TRY400
        else:
            print(f"pricing-service: {exc.reason}: {exc.message}", file=sys.stderr)
        sys.exit(1)


async def _rules(settings: Settings, args: argparse.Namespace) -> int:
    import pricing_service.rules.cli as rules_cli  # noqa: PLC0415

    connection_flags = (args.tls, args.plaintext, args.tls_ca_file, args.tls_cert_file,
                        args.tls_server_name)  # fmt: skip
    if not args.target and any(connection_flags):
        print("pricing-service: connection flags need --target (without it, rules reads and "
              "writes PRICING_RULE_STORE_URL directly)", file=sys.stderr)  # fmt: skip
        return 2
    if args.target:  # through the server's admin API
        from pricing_service import client_cli  # noqa: PLC0415

        return await asyncio.to_thread(client_cli.rules, settings, args)

    if args.rules_command == "import":
        return await rules_cli.import_rules(settings, args.file, args.actor)
    if args.rules_command == "upsert":
        return await rules_cli.upsert_rule(
            settings,
            seller_id=args.seller,
            item_id=args.item,
            crowd=args.crowd,
            price=args.price,
            currency=args.currency,
            start=args.start,
            end=args.end,
            actor=args.actor,
        )
    return await rules_cli.list_rules(settings, seller_id=args.seller, item_id=args.item)


async def _crowds(settings: Settings, args: argparse.Namespace) -> int:
    from pricing_service.rules import crowd_cli  # noqa: PLC0415

    cmd = args.crowds_command
    if cmd == "create":
        return await crowd_cli.create(
            settings,
            seller_id=args.seller,
            crowd_id=args.crowd_id,
            display_name=args.name,
            min_follow_days=args.min_follow_days,
            max_follow_days=args.max_follow_days,
            min_purchases=args.min_purchases,
            purchased_within_days=args.purchased_within_days,
            as_list=args.list,
            actor=args.actor,
        )
    if cmd == "get":
        return await crowd_cli.get(settings, seller_id=args.seller, crowd_id=args.crowd_id)
    if cmd == "delete":
        return await crowd_cli.delete(
            settings, seller_id=args.seller, crowd_id=args.crowd_id, actor=args.actor
        )
    if cmd == "list":
        return await crowd_cli.list_all(settings, seller_id=args.seller)
    if cmd == "history":
        return await crowd_cli.history(settings, seller_id=args.seller)
    return await crowd_cli.members(
        settings,
        seller_id=args.seller,
        crowd_id=args.crowd_id,
        users=[u.strip() for u in args.users.split(",") if u.strip()],
        removed=cmd == "remove",
        actor=args.actor,
    )


def serve(settings: Settings, otel: OtelSettings | None = None) -> int:
    """Run ``settings.workers`` server processes on one port (SO_REUSEPORT).

    With several workers the processes are forked here, before any gRPC object exists (gRPC
    does not survive a fork); each child runs its own event loop, server and clients and
    exports metrics on ``metrics_port + index``, and traces (``otel``; None: off) through a
    tracer provider of its own.
    """
    if settings.workers <= 1:
        return asyncio.run(_serve_one(settings, otel))

    def child(i: int) -> int:
        port = settings.metrics_port + i if settings.metrics_port else 0
        return asyncio.run(
            _serve_one(
                settings.model_copy(update={"metrics_port": port, "workers": 1}), otel, worker=i
            )
        )

    log.info("workers_starting", workers=settings.workers)
    return fork_workers(settings.workers, child)


async def _serve_one(settings: Settings, otel: OtelSettings | None, worker: int = 0) -> int:
    from grpc_health.v1 import health_pb2  # noqa: PLC0415 - no gRPC before fork

    from pricing_service.server import PricingServer  # noqa: PLC0415
    from pricing_service.tracing import build_tracer_provider  # noqa: PLC0415

    structlog.contextvars.bind_contextvars(worker=worker, pid=os.getpid())
    loop = asyncio.get_running_loop()
    provider = build_tracer_provider(otel) if otel is not None else None
    try:
        async with PricingServer(
            settings,
            tracer_provider=provider,
            propagate_traces=otel is None or otel.propagate,
        ) as server:
            if provider is not None and otel is not None:
                log.info("tracing_enabled", **tracing_summary(otel))
            # liveness: SERVING while this process's loop answers, whatever its dependencies
            # say (a Redis outage must not get every replica restarted: pages answer degraded)
            await server.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, server.request_stop)
            await server.run()
    finally:
        if provider is not None:  # export what is still queued (the drain's calls)
            await asyncio.to_thread(provider.shutdown)
    return 0


def tracing_summary(otel: OtelSettings) -> dict[str, object]:
    """What the ``tracing_enabled`` start-up line says of the tracing settings."""
    return {
        "exporters": list(otel.exporters),
        "endpoint": otel.traces_endpoint() if "otlp" in otel.exporters else None,
        "sampler": otel.traces_sampler,
        "sampler_ratio": otel.sampling_ratio if "ratio" in otel.traces_sampler else None,
        "service_name": otel.resource()["service.name"],
        "propagate": otel.propagate,
    }


if __name__ == "__main__":
    main()
