"""``sync-worker``: keep Redis crowd membership in step with snapshots and relation events.

Commands::

    sync-worker load-snapshot DIR [--parts 0,2 | --worker-index I --workers N | --jobs N | --claim]
    sync-worker consume
    sync-worker publish --type follow --user U --seller S [--at RFC3339] [--event-id ID]
    sync-worker publish --file events.jsonl
    sync-worker load-list --seller S --crowd C FILE [--at RFC3339]
    sync-worker migrate-membership
    sync-worker status

Configuration: ``PRICING_*`` environment variables (:mod:`pricing_service.config`).
Exit codes: 0 success, 1 failure (refused snapshot, error rate exceeded, Redis unreachable),
2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from pricing_service import watermark
from pricing_service.config import Settings, load_settings
from pricing_service.errors import ConfigError, PricingError
from pricing_service.logging import configure_logging
from pricing_service.membership.layout import MembershipLayout
from pricing_service.redis_client import make_redis
from sync_worker.common import TimeFormatError, parse_rfc3339_ms

log = structlog.get_logger("sync_worker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sync-worker",
        description="Sync crowd membership in Redis from snapshots and relation events. "
        "Configuration: PRICING_* environment variables.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load-snapshot", help="load a snapshot directory (resumable)")
    load.add_argument("directory")
    load.add_argument("--parts", default=None, help="comma-separated part indexes to load")
    load.add_argument("--worker-index", type=int, default=None, help="load parts i, i+n, ...")
    load.add_argument("--workers", type=int, default=None, help="n, with --worker-index")
    load.add_argument("--jobs", type=int, default=1, help="load with N processes")
    load.add_argument(
        "--claim",
        action="store_true",
        help="share the parts with every other --claim loader of this snapshot (a claim per "
        "part in Redis); run as many as you like, on any hosts",
    )
    load.add_argument("--batch-rows", type=int, default=None, help="rows per write batch")
    load.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    sub.add_parser("consume", help="consume relation events from the stream until SIGTERM")
    pub = sub.add_parser("publish", help="publish relation events to the stream")
    pub.add_argument("--type", choices=["follow", "unfollow", "purchase"])
    pub.add_argument("--user")
    pub.add_argument("--seller")
    pub.add_argument("--at", default=None, help="RFC 3339 time of the fact (default: now)")
    pub.add_argument("--event-id", default=None)
    pub.add_argument("--file", default=None, help="JSON lines: type, user_id, seller_id, ...")
    sub.add_parser("status", help="watermark, lag, pending entries, dead letters (JSON)")
    ll = sub.add_parser(
        "load-list", help="load a list file (user_id[,action] CSV) into a seller's list crowd"
    )
    ll.add_argument("file")
    ll.add_argument("--seller", required=True)
    ll.add_argument("--crowd", required=True, help="the list crowd's id")
    ll.add_argument("--at", default=None, help="RFC 3339 time of the list (default: now)")
    ll.add_argument("--batch-rows", type=int, default=None, help="buyers per write batch")
    sub.add_parser(
        "migrate-membership",
        help="convert every buyer hash of the layout before crowds-as-facts, then set the "
        "marker that ends legacy reads (run once every sync worker runs this version)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"sync-worker: {exc.message}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "load-snapshot":
            code = _load_snapshot(settings, args)
        elif args.command == "consume":
            code = asyncio.run(_consume(settings))
        elif args.command == "publish":
            code = asyncio.run(_publish(settings, args, parser))
        elif args.command == "load-list":
            code = asyncio.run(_load_list(settings, args, parser))
        elif args.command == "migrate-membership":
            code = asyncio.run(_migrate(settings))
        else:
            code = asyncio.run(_status(settings))
    except PricingError as exc:
        if args.command == "consume":  # a log line like every other line of the consumer
            log.error("consumer_failed", reason=exc.reason, message=exc.message)  # noqa: TRY400
        else:
            print(f"sync-worker: {exc.reason}: {exc.message}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


# --- load-snapshot ----------------------------------------------------------------------------
def _load_snapshot(settings: Settings, args: argparse.Namespace) -> int:
    from sync_worker.snapshot import Progress  # noqa: PLC0415
    from sync_worker.snapshot.run import load_one, merge_results  # noqa: PLC0415

    parts: list[int] | None = None
    if args.parts is not None:
        try:
            parts = [int(x) for x in args.parts.split(",") if x.strip()]
        except ValueError:
            print("sync-worker: --parts must be comma-separated integers", file=sys.stderr)
            return 2
    if args.claim and (parts is not None or args.worker_index is not None or args.jobs > 1):
        print("sync-worker: --claim excludes --parts, --worker-index and --jobs", file=sys.stderr)
        return 2
    if args.jobs > 1:
        if parts is not None or args.worker_index is not None:
            print("sync-worker: --jobs excludes --parts and --worker-index", file=sys.stderr)
            return 2
        from sync_worker.parallel import load_parallel  # noqa: PLC0415

        reports = load_parallel(settings, args.directory, args.jobs, batch_rows=args.batch_rows)
        print(json.dumps(merge_results(reports)), flush=True)
        return 0 if all(r["ok"] for r in reports) else 1

    def bar(total: int) -> Progress:
        return Progress(total, tty=sys.stderr.isatty() and not args.no_progress)

    report = asyncio.run(
        load_one(
            settings,
            args.directory,
            parts=parts,
            worker_index=args.worker_index,
            workers=args.workers,
            batch_rows=args.batch_rows,
            progress=None if args.claim else bar,
            claim=args.claim,
        )
    )
    print(json.dumps(report), flush=True)
    if not report["ok"]:
        print(f"sync-worker: load stopped: {report['message']}", file=sys.stderr)
        return 1
    return 0


# --- consume ------------------------------------------------------------------------------------
async def _consume(settings: Settings) -> int:
    from sync_worker.partitions import PartitionedConsumer  # noqa: PLC0415

    consumer = PartitionedConsumer(settings)
    stop_metrics = None
    if settings.worker_metrics_port:
        from sync_worker.metrics import serve_metrics  # noqa: PLC0415

        stop_metrics = serve_metrics(
            settings.worker_metrics_port,
            lambda: [(c.stream, c.stats) for c in consumer.consumers],
            addr=settings.worker_metrics_addr,
        )
    try:
        async with consumer:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, consumer.shutdown)
            await consumer.run()
    finally:
        if stop_metrics is not None:
            stop_metrics()
    return 0


# --- publish --------------------------------------------------------------------------------------
async def _publish(
    settings: Settings, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    from sync_worker.events import events_from_jsonl, make_event  # noqa: PLC0415
    from sync_worker.partitions import PartitionedPublisher  # noqa: PLC0415

    if args.file:
        if args.type or args.user or args.seller:
            parser.error("--file excludes --type/--user/--seller")
        with open(args.file, encoding="utf-8") as f:  # noqa: ASYNC230
            events = events_from_jsonl(f)
    else:
        if not (args.type and args.user and args.seller):
            parser.error("publish needs --type, --user and --seller (or --file)")
        if args.at:
            try:
                at = parse_rfc3339_ms(args.at)
            except TimeFormatError as exc:
                parser.error(str(exc))
        else:
            at = time.time_ns() // 1_000_000
        events = [make_event(args.type, args.user, args.seller, at, event_id=args.event_id)]
    redis = make_redis(settings)
    try:
        ids = await PartitionedPublisher(
            redis,
            settings.events_stream,
            settings.event_partitions,
            max_id_length=settings.max_id_length,
        ).publish(events)
    finally:
        await redis.aclose()
    print(json.dumps({"published": len(ids), "first_id": ids[0] if ids else None,
                      "last_id": ids[-1] if ids else None}))  # fmt: skip
    return 0


# --- lists and migration ---------------------------------------------------------------------
async def _load_list(
    settings: Settings, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    from sync_worker.lists import ListLoader  # noqa: PLC0415

    at = None
    if args.at:
        try:
            at = parse_rfc3339_ms(args.at)
        except TimeFormatError as exc:
            parser.error(str(exc))
    redis = make_redis(settings, socket_timeout_ms=max(settings.redis_socket_timeout_ms, 10_000))
    try:
        loader = ListLoader(settings, redis, batch_rows=args.batch_rows)
        report = await loader.load(args.seller, args.crowd, args.file, at_ms=at)
    finally:
        await redis.aclose()
    out = report.as_dict()
    log.info("list_load_finished", **out)
    print(json.dumps(out), flush=True)
    return 0 if report.ok else 1


async def _migrate(settings: Settings) -> int:
    from sync_worker.lists import migrate_membership  # noqa: PLC0415

    redis = make_redis(settings, socket_timeout_ms=max(settings.redis_socket_timeout_ms, 10_000))
    try:
        out = await migrate_membership(settings, redis)
    finally:
        await redis.aclose()
    print(json.dumps(out), flush=True)
    return 0 if out["marker_set"] else 1


# --- status -----------------------------------------------------------------------------------------
async def _status(settings: Settings) -> int:
    from sync_worker.partitions import partition_streams  # noqa: PLC0415

    redis = make_redis(settings)
    layout = MembershipLayout(settings.redis_namespace)
    streams = partition_streams(settings.events_stream, settings.event_partitions)
    try:
        reading = await watermark.read(redis, layout.watermark_key)
        caught_up = True
        pending = length = 0
        consumers: list[dict[str, Any]] = []
        for stream in streams:
            state = await watermark.stream_state(redis, stream, settings.consumer_group)
            caught_up = caught_up and state.caught_up
            pending += state.pending
            length += int(await redis.xlen(stream))
            with contextlib.suppress(Exception):
                for c in await redis.xinfo_consumers(stream, settings.consumer_group):
                    entry = {
                        "name": _s(c["name"]),
                        "pending": int(c["pending"]),
                        "idle_ms": int(c["idle"]),
                    }
                    if len(streams) > 1:
                        entry["stream"] = stream
                    consumers.append(entry)
        dead = await redis.xlen(settings.dead_letter_stream)
    finally:
        await redis.aclose()
    print(
        json.dumps(
            {
                "stream": settings.events_stream,
                "partitions": len(streams),
                "group": settings.consumer_group,
                "watermark_ms": reading.watermark_ms,
                "lag_ms": reading.lag_ms,
                "caught_up": bool(caught_up),
                "pending": pending,
                "stream_length": length,
                "dead_letters": int(dead),
                "consumers": consumers,
            }
        )
    )
    return 0


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


if __name__ == "__main__":
    main()
