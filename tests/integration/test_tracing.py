"""OpenTelemetry tracing through real gRPC calls, on every server runtime.

In process (a :class:`PricingServer` with a tracer provider injected, the SDK's in-memory
exporter behind it): a caller's W3C ``traceparent`` continues its trace, with the RPC span
under the caller's span and the page's membership ``HMGET`` under the RPC span; the strict
path's reads; a degraded page (Redis down) marked; a bounded index's misses; unsampled callers,
malformed headers, ``propagate_traces=False``; the canonical log line carrying the trace id, and
no span nor trace id with tracing off; the redis-py page read on a Redis Cluster.

Then a real ``pricing-service serve`` configured only by ``OTEL_*`` variables exports over
OTLP/HTTP (gzip, headers) to a receiver the test runs (:mod:`pricing_testing.otlp`), including
the spans still queued when SIGTERM arrives; and a bad ``OTEL_*`` value stops it at start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pricing.v1 import common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service import interceptors
from pricing_service.logging import configure_logging
from pricing_testing.otlp import OtlpReceiver, ReceivedSpan
from pricing_testing.procs import pricing_service, run_pricing_service, service_env, wait_serving
from pricing_testing.redis_cluster import RedisCluster
from pricing_testing.redis_server import RedisServer
from tests.integration.test_serving import (
    ALL,
    OLD,
    Harness,
    start_harness,
    stop_harness,
)
from tests.support.rpcs import upsert_fan_rule
from tests.unit.test_log_lines import Recorder

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_runtime")]

PAGE = "pricing.v1.PricingService/BatchGetLowestPrice"
STRICT = "pricing.v1.PricingService/CheckDiscountStrict"
CALLER_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN = 0x00F067AA0BA902B7


def traceparent(trace_id: int = CALLER_TRACE, span_id: int = CALLER_SPAN, flags: str = "01") -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags}"


class LogRecorder(Recorder):
    """The JSON lines the process writes (``configure_logging`` into this stream)."""

    def lines(self, event: str) -> list[dict[str, Any]]:
        entries = [json.loads(w) for w in self.writes if w.startswith("{")]
        return [e for e in entries if e.get("event") == event]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogRecorder]:
    import logging  # noqa: PLC0415

    root_handlers = list(logging.getLogger().handlers)
    rec = LogRecorder()
    configure_logging("INFO", "json", stream=rec)  # type: ignore[arg-type]
    # the module's logger may have been cached under another configuration by an earlier test
    monkeypatch.setattr(interceptors, "log", structlog.get_logger("pricing_service.rpc"))
    yield rec
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = root_handlers


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)  # ParentBased(ALWAYS_ON), as the default
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


Serve = Callable[..., contextlib.AbstractAsyncContextManager[Harness]]


@pytest.fixture
def serve(
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> Serve:
    """``async with serve(**settings) as h``: a server tracing to ``spans`` (``traced=False``:
    none; ``redis``: another Redis URL; ``propagate_traces``, settings overrides)."""

    @contextlib.asynccontextmanager
    async def start(
        *, redis: str | None = None, traced: bool = True, **options: Any
    ) -> AsyncIterator[Harness]:
        provider = spans[0] if traced else None
        h = await start_harness(
            redis or redis_url, namespace, tmp_path, tracer_provider=provider, **options
        )
        try:
            yield h
        finally:
            await stop_harness(h)

    return start


@pytest.fixture
async def traced(
    serve: Serve, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> AsyncIterator[tuple[Harness, InMemorySpanExporter]]:
    async with serve() as h:
        yield h, spans[1]


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def only(finished: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = by_name(finished, name)
    assert len(found) == 1, [s.name for s in finished]
    return found[0]


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return (
        span.parent is not None
        and span.parent.span_id == parent.context.span_id
        and span.context.trace_id == parent.context.trace_id
    )


async def page(
    h: Harness, user: str, *items: tuple[str, int], metadata: tuple[tuple[str, str], ...] = ()
) -> pricing_pb2.BatchGetLowestPriceResponse:
    req = pricing_pb2.BatchGetLowestPriceRequest(user_id=user)
    for item, amount in items:
        req.items.add(
            item_id=item, list_price=common_pb2.Money(currency_code="CNY", amount_minor=amount)
        )
    return await h.pricing.BatchGetLowestPrice(req, timeout=5, metadata=metadata)


# --- the page ---------------------------------------------------------------------------------


async def test_a_callers_traceparent_continues_its_trace_to_the_membership_read(
    traced: tuple[Harness, InMemorySpanExporter], logs: LogRecorder
) -> None:
    h, exporter = traced
    await h.rule("i1", ALL, 1990)
    await h.rule("i1", OLD, 1888)
    await h.follow("fan", days=90)
    exporter.clear()
    metadata = (
        ("traceparent", traceparent()),
        ("tracestate", "vendor=abc"),
        ("x-request-id", "rid-trace-1"),
    )
    r = await page(h, "fan", ("i1", 2500), metadata=metadata)
    assert r.prices[0].discounted and r.prices[0].price.amount_minor == 1888

    finished = exporter.get_finished_spans()
    rpc = only(finished, PAGE)
    assert rpc.kind == SpanKind.SERVER
    assert rpc.context.trace_id == CALLER_TRACE  # the caller's trace ...
    assert rpc.parent is not None and rpc.parent.span_id == CALLER_SPAN  # ... under its span
    assert rpc.parent.is_remote
    assert rpc.context.trace_state.get("vendor") == "abc"
    assert rpc.attributes is not None
    assert dict(rpc.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "pricing.v1.PricingService",
        "rpc.method": "BatchGetLowestPrice",
        "rpc.grpc.status_code": 0,
        "pricing.request_id": "rid-trace-1",
    }
    assert rpc.status.status_code == StatusCode.UNSET

    hmget = only(finished, "HMGET")
    assert child_of(hmget, rpc)
    assert hmget.kind == SpanKind.CLIENT
    assert hmget.attributes is not None
    # all_fans and old_fans of seller 42: the seller's fact field, and its three fields of the
    # earlier layout (read until `sync-worker migrate-membership` ran), in one round trip
    assert hmget.attributes["pricing.redis.fields"] == 4
    assert hmget.attributes["db.system.name"] == "redis"
    assert hmget.attributes["db.operation.name"] == "HMGET"
    assert hmget.attributes["server.port"] == int(
        h.settings.redis_url.rsplit(":", 1)[1].split("/")[0]
    )
    assert hmget.start_time is not None and rpc.start_time is not None
    assert rpc.start_time <= hmget.start_time and hmget.end_time <= rpc.end_time  # type: ignore[operator]
    assert len(finished) == 2  # nothing else (the index holds every item: no store read)

    # the canonical log line carries the trace and the RPC span
    line = next(x for x in logs.lines("rpc_finished") if x["request_id"] == "rid-trace-1")
    assert line["trace_id"] == f"{CALLER_TRACE:032x}"
    assert line["span_id"] == f"{rpc.context.span_id:016x}"
    assert line["code"] == "OK"
    assert "trace_id" not in structlog.contextvars.get_contextvars()  # nothing left bound


async def test_a_call_without_traceparent_starts_a_trace_whose_request_id_is_the_logs(
    traced: tuple[Harness, InMemorySpanExporter], logs: LogRecorder
) -> None:
    h, exporter = traced
    await h.rule("i1", ALL, 1990)
    exporter.clear()
    await page(h, "nobody", ("i1", 2500))
    rpc = only(exporter.get_finished_spans(), PAGE)
    assert rpc.parent is None  # a root
    line = next(x for x in logs.lines("rpc_finished") if x["rpc"] == "BatchGetLowestPrice")
    assert rpc.attributes is not None
    generated = rpc.attributes["pricing.request_id"]
    assert line["request_id"] == generated and len(str(generated)) == 32
    assert line["trace_id"] == f"{rpc.context.trace_id:032x}"


async def test_unsampled_and_malformed_callers(
    traced: tuple[Harness, InMemorySpanExporter], logs: LogRecorder
) -> None:
    """A caller that did not sample its trace gets none here either (parent-based sampler: no
    span, no trace id in the line); a malformed ``traceparent`` starts a new trace, the call
    itself unaffected."""
    h, exporter = traced
    await h.rule("i1", ALL, 1990)
    await h.follow("fan")
    exporter.clear()
    r = await page(
        h,
        "fan",
        ("i1", 2500),
        metadata=(("traceparent", traceparent(flags="00")), ("x-request-id", "unsampled")),
    )
    assert r.prices[0].discounted
    assert exporter.get_finished_spans() == ()
    line = next(x for x in logs.lines("rpc_finished") if x["request_id"] == "unsampled")
    assert "trace_id" not in line and "span_id" not in line

    for bad in ("00-zz-00f067aa0ba902b7-01", f"00-{0:032x}-{CALLER_SPAN:016x}-01", "garbage"):
        exporter.clear()
        r = await page(h, "fan", ("i1", 2500), metadata=(("traceparent", bad),))
        assert r.prices[0].discounted
        rpc = only(exporter.get_finished_spans(), PAGE)
        assert rpc.parent is None and rpc.context.trace_id != CALLER_TRACE


async def test_a_degraded_page_is_marked(
    private_redis: RedisServer,
    serve: Serve,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    logs: LogRecorder,
) -> None:
    exporter = spans[1]
    async with serve(
        redis=private_redis.url, breaker_failure_threshold=2, breaker_reset_ms=60_000
    ) as h:
        await h.rule("i1", ALL, 1990)
        await h.follow("fan")
        private_redis.kill()
        causes = []
        for i in range(3):
            exporter.clear()
            r = await page(h, "fan", ("i1", 2500), metadata=(("x-request-id", f"down-{i}"),))
            assert r.degraded and not r.prices[0].discounted
            finished = exporter.get_finished_spans()
            rpc = only(finished, PAGE)
            assert rpc.attributes is not None
            assert rpc.attributes["pricing.degraded"] is True
            causes.append(rpc.attributes["pricing.degraded.cause"])
            assert [e.name for e in rpc.events] == ["degraded"]
            assert rpc.status.status_code == StatusCode.UNSET  # answered OK, at list prices
            hmgets = by_name(finished, "HMGET")
            if i < 2:  # the read failed: its span says how
                assert len(hmgets) == 1 and child_of(hmgets[0], rpc)
                assert hmgets[0].status.status_code == StatusCode.ERROR
                assert any(e.name == "exception" for e in hmgets[0].events)
            else:  # the breaker is open: no read at all
                assert hmgets == []
            line = next(x for x in logs.lines("rpc_finished") if x["request_id"] == f"down-{i}")
            assert line["trace_id"] == f"{rpc.context.trace_id:032x}"
        assert causes[0] in ("redis_error", "timeout") and causes[2] == "breaker_open"


async def test_a_bounded_indexs_misses_are_read_under_the_page(
    serve: Serve, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    exporter = spans[1]
    async with serve(rule_index_max_items=1) as h:
        await h.rule("i1", ALL, 1990)
        await h.rule("i2", ALL, 1890)
        await h.follow("fan")
        await page(h, "fan", ("i1", 2500))
        exporter.clear()
        r = await page(h, "fan", ("i2", 2500), ("i3", 100))  # i2 evicted by i1, i3 never held
        assert [p.price.amount_minor for p in r.prices] == [1890, 100]
        finished = exporter.get_finished_spans()
        rpc = only(finished, PAGE)
        fetch = only(finished, "rule_index.fetch")
        read = only(finished, "rule_store.read")
        assert child_of(fetch, rpc) and child_of(read, fetch)
        assert fetch.kind == SpanKind.INTERNAL and read.kind == SpanKind.CLIENT
        assert fetch.attributes is not None and read.attributes is not None
        assert (
            fetch.attributes["pricing.items"] == 2 and fetch.attributes["pricing.items_read"] == 2
        )
        assert read.attributes["pricing.items"] == 2
        assert read.attributes["db.system.name"] == "sqlite"
        assert child_of(only(finished, "HMGET"), rpc)


# --- the strict path ---------------------------------------------------------------------------


async def test_a_strict_calls_reads_and_refusal(
    traced: tuple[Harness, InMemorySpanExporter], logs: LogRecorder
) -> None:
    h, exporter = traced
    await h.rule("i1", ALL, 1990)
    await h.follow("fan")
    await h.fresh_watermark()
    exporter.clear()
    req = pricing_pb2.CheckDiscountStrictRequest(user_id="fan", item_id="i1")
    resp = await h.pricing.CheckDiscountStrict(
        req, timeout=5, metadata=(("traceparent", traceparent()),)
    )
    assert resp.eligible
    finished = exporter.get_finished_spans()
    rpc = only(finished, STRICT)
    assert rpc.context.trace_id == CALLER_TRACE and rpc.status.status_code == StatusCode.UNSET
    store, clock, hmget = (only(finished, n) for n in ("rule_store.read", "EVAL", "HMGET"))
    for s in (store, clock, hmget):
        assert child_of(s, rpc) and s.kind == SpanKind.CLIENT
    assert store.start_time <= clock.start_time <= hmget.start_time  # type: ignore[operator]
    assert store.attributes is not None and clock.attributes is not None
    assert store.attributes["db.system.name"] == "sqlite"
    assert clock.attributes["pricing.redis.script"] == "clock_and_watermark"

    # a refusal: error status, the code, the reason
    await h.redis.delete(h.members.layout.watermark_key)
    exporter.clear()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.pricing.CheckDiscountStrict(req, timeout=5, metadata=(("x-request-id", "refused"),))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    rpc = only(exporter.get_finished_spans(), STRICT)
    assert rpc.status.status_code == StatusCode.ERROR
    assert rpc.status.description is not None and rpc.status.description.startswith("UNAVAILABLE: ")
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert rpc.attributes["error.type"] == "UNAVAILABLE"
    assert rpc.attributes["pricing.error.reason"] == "SYNC_WATERMARK_MISSING"
    line = next(x for x in logs.lines("rpc_finished") if x["request_id"] == "refused")
    assert line["trace_id"] == f"{rpc.context.trace_id:032x}"
    assert line["reason"] == "SYNC_WATERMARK_MISSING"

    # bad input: refused before any read, its span says so too
    exporter.clear()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.pricing.CheckDiscountStrict(pricing_pb2.CheckDiscountStrictRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finished = exporter.get_finished_spans()
    assert [s.name for s in finished] == [STRICT]
    assert finished[0].attributes is not None
    assert finished[0].attributes["error.type"] == "INVALID_ARGUMENT"


# --- off, and what is not traced -------------------------------------------------------------


async def test_tracing_off_makes_no_span_and_no_trace_id(
    serve: Serve, spans: tuple[TracerProvider, InMemorySpanExporter], logs: LogRecorder
) -> None:
    exporter = spans[1]
    async with serve(traced=False) as h:
        assert h.server.tracing is None
        await h.rule("i1", ALL, 1990)
        await h.follow("fan")
        await page(
            h,
            "fan",
            ("i1", 2500),
            metadata=(("traceparent", traceparent()), ("x-request-id", "off")),
        )
        line = next(x for x in logs.lines("rpc_finished") if x["request_id"] == "off")
        assert "trace_id" not in line and "span_id" not in line
        assert exporter.get_finished_spans() == ()


async def test_without_propagation_every_call_is_a_trace_of_its_own(
    serve: Serve, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """``OTEL_PROPAGATORS=none``: callers' headers are not trusted (nor their sampling)."""
    exporter = spans[1]
    async with serve(propagate_traces=False) as h:
        for flags in ("01", "00"):
            exporter.clear()
            await page(h, "u", ("i1", 100), metadata=(("traceparent", traceparent(flags=flags)),))
            rpc = only(exporter.get_finished_spans(), PAGE)
            assert rpc.parent is None and rpc.context.trace_id != CALLER_TRACE
        # health checks are never traced (probes every few seconds would bury the rest)
        exporter.clear()
        health = health_pb2_grpc.HealthStub(h.channel)
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert exporter.get_finished_spans() == ()


# --- Redis Cluster: the page's HMGET through redis-py -------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas_per_master=0) as c:
        yield c


async def test_the_page_read_on_a_redis_cluster_has_its_span(
    cluster: RedisCluster, serve: Serve, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    exporter = spans[1]
    async with serve(redis=cluster.url) as h:
        await h.rule("i1", ALL, 1990)
        await h.rule("i1", OLD, 1888)
        await h.follow("fan", days=90)
        exporter.clear()
        r = await page(h, "fan", ("i1", 2500), metadata=(("traceparent", traceparent()),))
        assert r.prices[0].price.amount_minor == 1888 and not r.degraded
        finished = exporter.get_finished_spans()
        rpc = only(finished, PAGE)
        hmget = only(finished, "HMGET")
        assert child_of(hmget, rpc) and rpc.context.trace_id == CALLER_TRACE
        assert hmget.attributes is not None
        assert hmget.attributes["pricing.redis.fields"] == 4  # fact field + 3 legacy fields
        assert hmget.attributes["db.system.name"] == "redis"
        assert "server.address" not in hmget.attributes  # a cluster: the node is redis-py's choice


# --- a real process, configured by OTEL_* only, exporting over OTLP/HTTP ---------------------------


def _wait_names(names: list[str], trace_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    def done(received: list[ReceivedSpan]) -> bool:
        got = [s.name for s in received if s.trace_id == trace_id]
        return all(got.count(n) >= names.count(n) for n in set(names))

    return done


def test_a_served_process_exports_over_otlp_http(
    private_redis: RedisServer, namespace: str, tmp_path: Path, server_runtime: str
) -> None:
    with OtlpReceiver() as receiver:
        env = service_env(
            redis_url=private_redis.url,
            namespace=namespace,
            tmp=tmp_path,
            extra={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=crowd%20pricing",
                "OTEL_SERVICE_NAME": "pricing-under-test",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
                # a batch as soon as three spans wait (the rule's upsert, the page's two),
                # else only at shutdown
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3",
                "OTEL_BSP_SCHEDULE_DELAY": "600000",
            },
        )
        proc = pricing_service(env, tmp_path / "server.log")
        target = env["PRICING_LISTEN"]
        try:
            wait_serving(target, proc)
            with grpc.insecure_channel(target) as channel:
                upsert_fan_rule(channel, 1990)
                time.sleep(0.3)  # the index's refresh
                stub = pricing_pb2_grpc.PricingServiceStub(channel)
                req = pricing_pb2.BatchGetLowestPriceRequest(
                    user_id="u1",
                    items=[
                        pricing_pb2.PriceQuery(
                            item_id="1001",
                            list_price=common_pb2.Money(currency_code="CNY", amount_minor=2500),
                        )
                    ],
                )
                stub.BatchGetLowestPrice(
                    req,
                    timeout=5,
                    metadata=(("traceparent", traceparent()), ("x-request-id", "otlp-1")),
                )
                caller = f"{CALLER_TRACE:032x}"
                received = receiver.wait_for(_wait_names([PAGE, "HMGET"], caller))
                # one more span, alone in the queue: exported only by the shutdown's flush
                with pytest.raises(grpc.RpcError):
                    stub.CheckDiscountStrict(
                        pricing_pb2.CheckDiscountStrictRequest(),
                        timeout=5,
                        metadata=(("traceparent", traceparent(trace_id=CALLER_TRACE + 1)),),
                    )
            time.sleep(0.2)
            assert not any(s.name == STRICT for s in receiver.spans)
        finally:
            code = proc.terminate()
        assert code == 0, proc.log()[-3000:]
        flushed = receiver.wait_for(_wait_names([STRICT], f"{CALLER_TRACE + 1:032x}"), timeout=5)
    rpc = next(s for s in received if s.name == PAGE)
    hmget = next(s for s in received if s.name == "HMGET")
    assert rpc.trace_id == caller and rpc.parent_span_id == f"{CALLER_SPAN:016x}"
    assert hmget.trace_id == caller and hmget.parent_span_id == rpc.span_id
    assert rpc.attributes["pricing.request_id"] == "otlp-1"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert hmget.attributes["pricing.redis.fields"] == 4  # fact field + 3 legacy fields
    assert rpc.resource["service.name"] == "pricing-under-test"
    assert rpc.resource["deployment.environment.name"] == "test"
    assert rpc.resource["process.pid"] == proc.proc.pid
    assert rpc.scope == "pricing_service"
    refused = next(s for s in flushed if s.name == STRICT)
    assert refused.attributes["error.type"] == "INVALID_ARGUMENT"
    assert all(h["x-tenant"] == "crowd pricing" for h in receiver.headers)
    assert all(h["content-encoding"] == "gzip" for h in receiver.headers)
    log = [json.loads(x) for x in proc.log().splitlines() if x.startswith("{")]
    line = next(
        x for x in log if x.get("event") == "rpc_finished" and x.get("request_id") == "otlp-1"
    )
    assert line["trace_id"] == caller and line["span_id"] == rpc.span_id
    started = next(x for x in log if x.get("event") == "tracing_enabled")
    assert started["endpoint"] == receiver.endpoint + "/v1/traces"
    assert started["service_name"] == "pricing-under-test"


def test_a_bad_otel_variable_stops_the_server_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRICING_", "OTEL_"))}
    env.update(
        {
            "PRICING_RULE_STORE_URL": f"sqlite:///{tmp_path / 'rules.db'}",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "5%",
        }
    )
    done = run_pricing_service(env, "serve", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "OTEL_TRACES_SAMPLER_ARG" in done.stderr and "'5%'" in done.stderr
    env["OTEL_TRACES_SAMPLER_ARG"] = "0.05"
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    done = run_pricing_service(env, "serve", timeout=60)
    assert done.returncode == 2 and "OTEL_EXPORTER_OTLP_PROTOCOL" in done.stderr, done.stderr
