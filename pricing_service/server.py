"""Server lifecycle.

An ``AsyncExitStack`` opens the clients (Redis, rule store), loads the rule index, then the gRPC
server starts, then health says SERVING. On shutdown: health NOT_SERVING, ``server.stop(grace)``
drains in-flight calls, then everything closes in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType

import grpc
import redis.asyncio as aioredis
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from pricing.v1 import admin_pb2, admin_pb2_grpc, pricing_pb2, pricing_pb2_grpc
from pricing_service.breaker import CircuitBreaker
from pricing_service.config import Settings
from pricing_service.crowds import CrowdDef
from pricing_service.domain import Clock, SystemClock
from pricing_service.interceptors import RpcPipeline
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from pricing_service.metrics import Metrics
from pricing_service.pricing import PricingCore
from pricing_service.ratelimit import RateLimiter
from pricing_service.redis_client import is_cluster, make_redis
from pricing_service.redis_pipe import ClientReader, PipelinedReader
from pricing_service.rules.crowd_index import CrowdIndex
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.index import RuleIndex
from pricing_service.runtime import MethodTable, RuntimeServer, ServerParts, select_runtime
from pricing_service.servicers.admin import DiscountAdminServicer
from pricing_service.servicers.pricing import PricingServicer
from pricing_service.tracing import Tracing

log = structlog.get_logger("pricing_service.server")

SERVICE_NAMES = (
    pricing_pb2.DESCRIPTOR.services_by_name["PricingService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["DiscountAdminService"].full_name,
)
HEALTH_INTERVAL_S = 1.0


class PricingServer:
    """The pricing process: ``async with PricingServer(settings) as s: await s.run()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        metrics_port: int | None = None,
        tracer_provider: TracerProvider | None = None,
        propagate_traces: bool = True,
    ) -> None:
        self.settings = settings
        #: spans of RPCs and their reads, to this provider (None: tracing off); with
        #: ``propagate_traces`` a caller's W3C ``traceparent`` continues its trace
        self.tracing = (
            None
            if tracer_provider is None
            else Tracing(
                tracer_provider,
                propagate=propagate_traces,
                redis_url=settings.redis_url,
                rule_store_url=settings.rule_store_url,
            )
        )
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self._metrics_port = settings.metrics_port if metrics_port is None else metrics_port
        self._stack = AsyncExitStack()
        self._stop = asyncio.Event()
        #: the gRPC runtime (``PRICING_SERVER_RUNTIME``), checked against the settings here
        self.runtime = select_runtime(settings)
        self._server: RuntimeServer | None = None
        self.health = HealthServicer()
        self.port = 0
        self.index: RuleIndex | None = None
        self.crowds: CrowdIndex | None = None
        self.core: PricingCore | None = None
        self._serving: bool | None = None
        self._shutting_down = False

    async def __aenter__(self) -> PricingServer:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def _start(self) -> None:
        s = self.settings
        stack = self._stack
        redis = make_redis(s)
        stack.push_async_callback(redis.aclose)
        store = await open_rule_store(s)
        stack.push_async_callback(store.close)
        tracing = self.tracing
        self.index = index = RuleIndex(store, s, self.clock, self.metrics, tracing=tracing)
        await stack.enter_async_context(index)
        layout = MembershipLayout(s.redis_namespace)
        reader = None
        if not is_cluster(redis):  # a cluster keeps redis-py (slot routing, redirections)
            reader = PipelinedReader.from_client(redis, tracing=tracing)
            stack.push_async_callback(reader.aclose)
        elif tracing is not None:  # redis-py's page reads, with the reader's HMGET span
            reader = ClientReader(redis, tracing=tracing)
        membership = MembershipStore(
            redis,
            layout,
            self.clock,
            self.metrics,
            reader=reader,
            old_fan_min_days=s.old_fan_min_days,
        )

        async def publish_lists(created: Sequence[CrowdDef], deleted: Sequence[CrowdDef]) -> None:
            await membership.unregister_lists(deleted)
            await membership.register_lists(created)

        self.crowds = crowds = CrowdIndex(
            store,
            s.rule_refresh_interval_ms / 1000,
            on_lists=publish_lists,
            on_change=membership.crowds_changed,
        )
        await stack.enter_async_context(crowds)
        membership.crowds = crowds.by_key
        with contextlib.suppress(RedisError, OSError):
            await membership.load_script()  # readers do not need it; a write-capable warm-up
            await membership.check_layout_marker()
        await _check_listpack_limit(redis)

        def breaker_changed(is_open: bool) -> None:
            self.metrics.breaker_state.set(1 if is_open else 0)
            log.warning("redis_breaker_opened" if is_open else "redis_breaker_closed")

        breaker = CircuitBreaker(
            s.breaker_failure_threshold, s.breaker_reset_ms / 1000, on_change=breaker_changed
        )

        def rule_breaker_changed(is_open: bool) -> None:
            self.metrics.rule_breaker_state.set(1 if is_open else 0)
            log.warning("rule_store_breaker_opened" if is_open else "rule_store_breaker_closed")

        rule_breaker = CircuitBreaker(
            s.breaker_failure_threshold, s.breaker_reset_ms / 1000, on_change=rule_breaker_changed
        )
        self.core = core = PricingCore(
            index,
            store,
            membership,
            self.clock,
            self.metrics,
            membership_budget_ms=s.membership_budget_ms,
            strict_max_lag_ms=s.strict_max_lag_ms,
            strict_budget_ms=s.strict_budget_ms,
            breaker=breaker,
            rule_fetch_budget_ms=s.rule_fetch_budget_ms,
            rule_breaker=rule_breaker,
            tracing=tracing,
        )
        if self._metrics_port:
            httpd, _thread = start_http_server(
                self._metrics_port,
                addr=s.metrics_host(),
                registry=self.metrics.registry,
            )
            stack.callback(httpd.shutdown)

        limiter = (
            RateLimiter(s.rate_limit_rps, s.rate_limit_burst or max(s.rate_limit_rps, 1.0))
            if s.rate_limit_rps > 0
            else None
        )
        pipeline = RpcPipeline(
            self.metrics, max_concurrent_rpcs=s.max_concurrent_rpcs, limiter=limiter,
            tracing=tracing,
        )  # fmt: skip
        methods = MethodTable()
        pricing_pb2_grpc.add_PricingServiceServicer_to_server(
            PricingServicer(
                core,
                max_batch_items=s.max_batch_items,
                max_id_length=s.max_id_length,
                read_tokens=s.read_tokens(),
            ),
            methods,
        )
        admin_pb2_grpc.add_DiscountAdminServiceServicer_to_server(
            DiscountAdminServicer(store, s, self.clock, membership), methods
        )

        def add_grpcio_services(server: grpc.aio.Server) -> None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (
                    *SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )

        server = self.runtime.build(
            ServerParts(
                settings=s,
                pipeline=pipeline,
                methods=methods,
                add_grpcio_services=add_grpcio_services,
                grpc_options=[
                    ("grpc.max_receive_message_length", s.max_message_bytes),
                    ("grpc.max_send_message_length", s.max_message_bytes),
                    ("grpc.so_reuseport", 1),
                ],
            )
        )
        self.port = server.port
        await server.start()
        self._server = server
        await self._update_health()
        monitor = asyncio.create_task(self._health_loop(redis, membership), name="health-monitor")
        stack.push_async_callback(_cancel, monitor)
        # Everything loaded so far (rule index, clients, modules) lives as long as the process:
        # move it out of the collector's generations, so a full collection walks only what
        # requests allocate. Measured with bench.serving's data (6,000 rules, ~78k tracked
        # objects): a full collection paused the loop 56 ms before, 0.01 ms after.
        gc.collect()
        gc.freeze()
        log.info(
            "server_started",
            listen=s.listen,
            port=self.port,
            runtime=self.runtime.NAME,
            rule_revision=index.revision,
        )

    async def _update_health(self, redis_ok: bool = True) -> None:
        index, crowds = self.index, self.crowds
        ok = (
            bool(index is not None and index.loaded and crowds is not None and crowds.loaded)
            and redis_ok
            and not self._shutting_down
        )
        if ok == self._serving:
            return
        self._serving = ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)
        log.info("health_changed", serving=ok)

    async def _health_loop(self, redis: aioredis.Redis, membership: MembershipStore) -> None:
        # Ends by itself once shutdown starts: a cancellation that lands inside the ping can be
        # swallowed (redis-py / asyncio.timeout), and awaiting the cancelled task then hung the
        # shutdown forever (found by tests/fault: SIGTERM while Redis was slow).
        while not self._stop.is_set():
            try:
                async with asyncio.timeout(0.5):
                    await redis.ping()
                    if membership.legacy_reads:  # until `sync-worker migrate-membership` ran
                        await membership.check_layout_marker()
                ok = True
            except (TimeoutError, RedisError, OSError):
                ok = False
            await self._update_health(ok)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), HEALTH_INTERVAL_S)

    async def run(self) -> None:
        """Serve until :meth:`shutdown` (or :meth:`request_stop`) is called."""
        await self._stop.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        """Signal-handler safe: ask :meth:`run` to shut down."""
        self._stop.set()

    async def shutdown(self) -> None:
        """NOT_SERVING, drain in-flight RPCs within the grace period, close in reverse."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._stop.set()
        log.info("server_stopping", grace_s=self.settings.grace_period_s)
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_period_s)
        await self._stack.aclose()
        log.info("server_stopped")


#: Below this, buyers who follow hundreds of sellers leave the compact listpack encoding and
#: their memberships take ~4x the memory (docs/OPERATIONS.md, bench/memory.py).
RECOMMENDED_LISTPACK_ENTRIES = 1024


async def _check_listpack_limit(redis: aioredis.Redis) -> None:
    """Warn (once, at start-up) when Redis keeps small hashes compact only up to a lower size."""
    try:
        reply = await redis.config_get("hash-max-listpack-entries")
    except (RedisError, OSError):
        return  # CONFIG may be disabled (managed Redis) or Redis away: this is only advice
    raw = next(iter(reply.values()), None) if isinstance(reply, dict) else None
    if raw is not None and int(raw) < RECOMMENDED_LISTPACK_ENTRIES:
        log.warning(
            "redis_listpack_limit_low",
            hash_max_listpack_entries=int(raw),
            recommended=RECOMMENDED_LISTPACK_ENTRIES,
        )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
