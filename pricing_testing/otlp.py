"""A real OTLP/HTTP trace receiver on loopback, for the tests and ``bench.serving --otel``.

What an OpenTelemetry Collector's ``otlp`` receiver does for traces over HTTP: ``POST
/v1/traces`` with an ``ExportTraceServiceRequest`` protobuf body (``Content-Encoding: gzip``
or none), answered ``200`` with an ``ExportTraceServiceResponse``. Each request's headers and
spans are kept (``keep=False``: only counted, for the benchmark) and can be waited for.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

PATH = "/v1/traces"


def value_of(v: AnyValue) -> Any:
    """An OTLP attribute value as Python."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(kvs: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` list as a dict."""
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = value_of(kv.value)
    return out


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as received, with its resource's attributes."""

    resource: dict[str, Any]
    scope: str
    span: Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return attrs(self.span.attributes)


@dataclass
class OtlpReceiver:
    """``with OtlpReceiver() as r: ... r.wait_for(lambda spans: ...)``; ``r.endpoint`` is the
    base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT``. ``cpus``: the CPUs its thread runs on."""

    keep: bool = True
    cpus: set[int] | None = None
    requests: int = 0
    span_count: int = 0
    bytes_received: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    spans: list[ReceivedSpan] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if self.path != PATH:
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                receiver._received(dict(self.headers.items()), len(body), request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._serve, name="otlp-receiver", daemon=True)

    def _serve(self) -> None:
        if self.cpus:
            os.sched_setaffinity(threading.get_native_id(), self.cpus)
        self._server.serve_forever(poll_interval=0.05)

    def _received(
        self, headers: dict[str, str], size: int, request: ExportTraceServiceRequest
    ) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_received += size
            if self.keep:
                self.headers.append({k.lower(): v for k, v in headers.items()})
            for rs in request.resource_spans:
                resource = attrs(rs.resource.attributes) if self.keep else {}
                for ss in rs.scope_spans:
                    self.span_count += len(ss.spans)
                    if self.keep:
                        self.spans.extend(
                            ReceivedSpan(resource, ss.scope.name, s) for s in ss.spans
                        )
            self._lock.notify_all()

    @property
    def endpoint(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():  # (shutdown() waits for a serve_forever that never ran)
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        """The spans received once ``done(spans)`` holds (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not done(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"OTLP receiver: condition not met in {timeout} s; received "
                        f"{[s.name for s in self.spans]}"
                    )
                self._lock.wait(left)
            return list(self.spans)
