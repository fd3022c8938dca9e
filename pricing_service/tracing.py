"""OpenTelemetry tracing of the serving path: off by default, one tracer passed down.

Switched on by the standard ``OTEL_*`` variables (:class:`~pricing_service.config.OtelSettings`:
``OTEL_TRACES_EXPORTER=otlp`` and no ``OTEL_SDK_DISABLED=true``), read once by
``pricing-service serve``; :func:`build_tracer_provider` makes the SDK's provider from them
(sampler, resource, OTLP/HTTP exporter behind a batch span processor). Nothing here is global:
the provider is passed to :class:`~pricing_service.server.PricingServer`, which hands one
:class:`Tracing` to what makes spans (no ``set_tracer_provider``; tests inject their own).

Spans (``docs/OPERATIONS.md`` lists their attributes):

* the RPC (:meth:`Tracing.wrap_rpc`, around the whole :class:`~pricing_service.interceptors.
  RpcPipeline` call, on every server runtime): a SERVER span continuing the caller's W3C
  ``traceparent``/``tracestate`` metadata, with the gRPC status code and the request id, error
  status on non-OK, ``pricing.degraded`` on a page answered at list prices;
* under it, only while it records (an unsampled call makes no child spans at all): the page's
  membership ``HMGET`` (the pipelined reader's round trip, or redis-py's on Redis Cluster), the
  rule-index misses' wait and their rule-store read, and the strict path's reads (rule store,
  the clock + watermark ``EVAL`` and the ``HMGET`` on the primary).

While a call's span records, its ``trace_id`` and ``span_id`` are bound into the log context:
the canonical ``rpc_finished`` line (and any other line of the call) carries them.

Tracing off costs the serving path nothing: the pipeline is wrapped, or not, once per method
when the server starts, and the page's reader checks ``tracing is None`` once per read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from importlib import metadata as importlib_metadata
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import grpc
import structlog
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pricing_service.config import CLUSTER_SCHEMES
from pricing_service.interceptors import Failure, Invoke, _request_id, cancelled_code
from pricing_service.otel_config import OtelSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.util.types import AttributeValue

INSTRUMENTATION = "pricing_service"
#: Methods never traced: health probes (every few seconds from every orchestrator) and
#: reflection would fill the traces with nothing to see.
UNTRACED: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_W3C = TraceContextTextMapPropagator()
_W3C_KEYS = frozenset(("traceparent", "tracestate"))
_NO_SPAN: AbstractContextManager[Any] = contextlib.nullcontext()
_OK = grpc.StatusCode.OK
_ROOT = otel_context.Context()  # no caller trace: the call's span is a root


def _version() -> str:
    try:
        return importlib_metadata.version("crowd-pricing")
    except importlib_metadata.PackageNotFoundError:
        return "0"


# --- the provider ------------------------------------------------------------------------------


def build_tracer_provider(otel: OtelSettings) -> SdkTracerProvider | None:
    """The SDK tracer provider the settings ask for, or None when tracing is off.

    Built after ``--workers`` forked (one per process; the batch processor's thread does not
    survive a fork). Its owner calls ``shutdown()`` after the server stopped: that exports what
    the drain's calls left in the queue."""
    if not otel.enabled:
        return None
    from opentelemetry.sdk import resources  # noqa: PLC0415 - the SDK only when tracing
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    attributes: dict[str, AttributeValue] = {
        resources.TELEMETRY_SDK_LANGUAGE: "python",
        resources.TELEMETRY_SDK_NAME: "opentelemetry",
        resources.TELEMETRY_SDK_VERSION: importlib_metadata.version("opentelemetry-sdk"),
        resources.SERVICE_VERSION: _version(),
        resources.PROCESS_PID: os.getpid(),
        resources.HOST_NAME: socket.gethostname(),
    }
    attributes.update(otel.resource())
    provider = TracerProvider(
        sampler=make_sampler(otel),
        resource=resources.Resource(attributes),
        shutdown_on_exit=False,  # the server's owner shuts it down (workers end in os._exit)
    )
    for name in otel.exporters:
        exporter: SpanExporter
        if name == "otlp":
            exporter = _otlp_exporter(otel)
        else:  # console: one JSON object per span on standard output (logs are on stderr)
            exporter = ConsoleSpanExporter(
                out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
            )
        provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=otel.bsp_max_queue_size,
                schedule_delay_millis=otel.bsp_schedule_delay,
                max_export_batch_size=otel.bsp_max_export_batch_size,
                export_timeout_millis=otel.bsp_export_timeout,
            )
        )
    return provider


def make_sampler(otel: OtelSettings) -> Sampler:
    """``OTEL_TRACES_SAMPLER`` (and ``_ARG``) as the SDK's sampler."""
    from opentelemetry.sdk.trace import sampling  # noqa: PLC0415

    name = otel.traces_sampler
    base = name.removeprefix("parentbased_")
    root: sampling.Sampler = (
        sampling.ALWAYS_ON
        if base == "always_on"
        else sampling.ALWAYS_OFF
        if base == "always_off"
        else sampling.TraceIdRatioBased(otel.sampling_ratio)
    )
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def _otlp_exporter(otel: OtelSettings) -> Any:
    from opentelemetry.exporter.otlp.proto.http import Compression  # noqa: PLC0415
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    ca, cert, key = otel.traces_tls_files()
    return OTLPSpanExporter(
        endpoint=otel.traces_endpoint(),
        certificate_file=ca,
        client_certificate_file=cert,
        client_key_file=key,
        headers=otel.traces_headers(),
        timeout=otel.traces_timeout_s(),
        compression=(
            Compression.Gzip if otel.traces_compression() == "gzip" else Compression.NoCompression
        ),
    )


# --- spans -------------------------------------------------------------------------------------


class Tracing:
    """The spans of one server process (see the module docstring).

    ``propagate``: whether a caller's ``traceparent`` continues its trace (``OTEL_PROPAGATORS``
    without ``tracecontext``: every call starts a trace of its own)."""

    def __init__(
        self,
        provider: trace.TracerProvider,
        *,
        propagate: bool = True,
        redis_url: str = "",
        rule_store_url: str = "",
    ) -> None:
        self.tracer = provider.get_tracer(INSTRUMENTATION, _version())
        self.propagate = propagate
        #: attributes of every Redis span (OpenTelemetry's database conventions)
        self.redis_attributes: dict[str, AttributeValue] = redis_attributes(redis_url)
        self.rule_store_attributes: dict[str, AttributeValue] = {
            "db.system.name": "sqlite" if rule_store_url.startswith("sqlite") else "postgresql"
        }

    def span(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        kind: SpanKind = SpanKind.CLIENT,
        *,
        leaf: bool = False,
    ) -> AbstractContextManager[Any]:
        """A span under the current one while that one records; otherwise nothing. A ``leaf``
        (no span of its own under it: a Redis command, a store query) is not made current,
        which saves the context switch."""
        parent = trace.get_current_span()
        if not parent.is_recording():
            return _NO_SPAN
        if leaf:
            return _Leaf(self.tracer.start_span(name, kind=kind, attributes=attributes))
        return self.tracer.start_as_current_span(name, kind=kind, attributes=attributes)

    def redis(
        self, operation: str, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AbstractContextManager[Any]:
        """A Redis command's span (``HMGET``, ``EVAL``), under a recording span."""
        if not trace.get_current_span().is_recording():
            return _NO_SPAN
        span = self.tracer.start_span(
            operation,
            kind=SpanKind.CLIENT,
            attributes={
                **self.redis_attributes,
                "db.operation.name": operation,
                **(attributes or {}),
            },
        )
        return _Leaf(span)

    def rule_store(self, items: int) -> AbstractContextManager[Any]:
        """A rule-store read's span (``rule_store.read`` of ``items`` items), under a recording
        span."""
        attributes = {**self.rule_store_attributes, "pricing.items": items}
        return self.span("rule_store.read", attributes, leaf=True)

    def wrap_rpc(self, method: str, call: Invoke) -> Invoke:
        """``call`` (a method behind the pipeline) inside the RPC's server span."""
        if method.startswith(UNTRACED):
            return call
        tracer = self.tracer
        name = method.lstrip("/")
        service, _, short = name.rpartition("/")
        base: dict[str, AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": short,
        }
        propagate = self.propagate
        bind = structlog.contextvars.bind_contextvars
        reset = structlog.contextvars.reset_contextvars

        async def traced(request: Any, context: Any) -> Any:
            metadata = context.invocation_metadata() or ()
            parent = (caller_context(metadata) if propagate else None) or _ROOT
            span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=base)
            if not span.is_recording():  # not sampled: no child spans, nothing to end
                return await call(request, context)
            # the id the pipeline will use (the caller's, or one made here), first in the
            # call's metadata, so that the span and the log line carry the same one
            request_id = _request_id(context)
            context = _WithRequestId(context, (("x-request-id", request_id), *metadata))
            span.set_attribute("pricing.request_id", request_id)
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            ids = span.get_span_context()
            bound = bind(trace_id=f"{ids.trace_id:032x}", span_id=f"{ids.span_id:016x}")
            code = _OK
            failure: Failure | None = None
            try:
                result = await call(request, context)
                if result.__class__ is Failure:
                    failure = result
                    code = result.code
                return result
            except grpc.aio.AbortError:  # (a grpcio servicer's own abort)
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:  # as the pipeline logs it
                code = cancelled_code(context)
                raise
            except BaseException:  # (the pipeline answers every Exception: not expected)
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                if code is _OK:
                    span.set_attribute("rpc.grpc.status_code", 0)
                else:
                    _failed(span, code, failure)
                reset(**bound)
                span.end()
                otel_context.detach(token)

        return traced


class _Leaf:
    """A started span that is ended (with the error, if one was raised) on exit, without
    becoming the current span."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def __enter__(self) -> trace.Span:
        return self._span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if exc is not None:  # as the SDK's own use_span does
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def _failed(span: trace.Span, code: grpc.StatusCode, failure: Failure | None) -> None:
    """The code, error status, ``error.type`` (the code's name) and the error's reason (from
    the ``ErrorInfo`` of the call's status details)."""
    attributes: dict[str, AttributeValue] = {
        "rpc.grpc.status_code": code.value[0],
        "error.type": code.name,
    }
    message = failure.message if failure is not None else ""
    for key, value in failure.trailing_metadata if failure is not None else ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    attributes["pricing.error.reason"] = info.reason
    span.set_attributes(attributes)
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}" if message else code.name))


def caller_context(metadata: Sequence[tuple[str, str | bytes]]) -> otel_context.Context | None:
    """The caller's trace from W3C ``traceparent`` / ``tracestate`` metadata, or None (no
    ``traceparent``, or one that does not parse: the call starts a trace of its own)."""
    carrier: dict[str, str] | None = None
    for key, value in metadata:
        if key in _W3C_KEYS and isinstance(value, str):
            if carrier is None:
                carrier = {}
            carrier[key] = value
    if carrier is None or "traceparent" not in carrier:
        return None
    return _W3C.extract(carrier, context=otel_context.Context())


class _WithRequestId:
    """A call's context whose metadata starts with the request id the pipeline uses."""

    __slots__ = ("_context", "_metadata")

    def __init__(self, context: Any, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._context = context
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        peer: str = self._context.peer()
        return peer

    def time_remaining(self) -> float | None:
        remaining: float | None = self._context.time_remaining()
        return remaining

    def __getattr__(self, name: str) -> Any:  # code(), abort(), ... of the runtime's context
        return getattr(self._context, name)


def internal_span(
    tracing: Tracing | None, name: str, attributes: Mapping[str, AttributeValue] | None = None
) -> AbstractContextManager[Any]:
    """An INTERNAL span under a recording one (:meth:`Tracing.span`), or nothing when tracing
    is off."""
    return _NO_SPAN if tracing is None else tracing.span(name, attributes, SpanKind.INTERNAL)


def rule_store_read(tracing: Tracing | None, items: int) -> AbstractContextManager[Any]:
    """:meth:`Tracing.rule_store`, or nothing when tracing is off."""
    return _NO_SPAN if tracing is None else tracing.rule_store(items)


def redis_command(
    tracing: Tracing | None, operation: str, attributes: Mapping[str, AttributeValue] | None = None
) -> AbstractContextManager[Any]:
    """:meth:`Tracing.redis`, or nothing when tracing is off."""
    return _NO_SPAN if tracing is None else tracing.redis(operation, attributes)


def mark_degraded(cause: str) -> None:
    """Mark the current span (the RPC's, on the page path) as answered degraded by ``cause``
    (``pricing_degraded_answers_total``'s label). Nothing when no span records."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("pricing.degraded", True)
        span.set_attribute("pricing.degraded.cause", cause)
        span.add_event("degraded", {"pricing.degraded.cause": cause})


def redis_attributes(url: str) -> dict[str, AttributeValue]:
    """``db.system.name`` and, for one Redis (not a cluster), ``server.address`` /
    ``server.port`` / ``db.namespace`` (the database number) from ``PRICING_REDIS_URL``."""
    out: dict[str, AttributeValue] = {"db.system.name": "redis"}
    if not url or url.startswith(CLUSTER_SCHEMES):
        return out
    parts = urlsplit(url)
    if parts.scheme == "unix":
        out["server.address"] = parts.path
        return out
    out["server.address"] = parts.hostname or "127.0.0.1"
    out["server.port"] = parts.port or 6379
    out["db.namespace"] = parts.path.strip("/") or "0"
    return out
