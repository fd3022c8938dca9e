"""The ``native`` runtime: pygrpc-native's ``NativeGrpcFront``, calls as events on our loop.

The front runs HTTP/2, gRPC framing, flow control, deadlines and cancellation in Rust threads
outside the GIL. Each unary call of our services reaches Python as an event (call id, method
id, request bytes, metadata, peer, time remaining) and is answered by id with the response
bytes (``respond``) or a status with trailing metadata (``fail``). In between, the call runs
the same :class:`~pricing_service.interceptors.RpcPipeline` and servicer as on grpcio.

Everything else the front does not serve natively (health ``Watch`` streams, reflection's
bidirectional stream, unknown methods) it passes to a ``grpc.aio`` server on a private Unix
socket behind it, with the same pipeline as its interceptor: health and reflection behave
exactly as on the ``grpcio-aio`` runtime.

How calls reach the loop, and a drain
-------------------------------------
``pricing_service.runtime.native_pump`` moves call events to the loop (``PRICING_NATIVE_PUMP``).
The front's I/O threads run under ``SCHED_BATCH`` (``PRICING_NATIVE_IO_POLICY``), so an answer
that wakes one does not preempt the loop. pygrpc-native 0.5 has no graceful close (its
``close()`` ends open streams and drops answers its I/O threads have not taken), so a drain
stops accepting connections, serves every call on the open ones, and closes once the front
itself counts no call left open (:meth:`NativeServer._idle_now`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pygrpc_native import EVENT_CANCEL, NativeGrpcFront
from pygrpc_native import __version__ as NATIVE_VERSION

from pricing_service.config import Settings
from pricing_service.interceptors import (
    INTERNAL_MESSAGE,
    Failure,
    Invoke,
    ServerInterceptor,
    passing_bytes,
    tolerant,
)
from pricing_service.runtime import ServerParts
from pricing_service.runtime.native_os import (
    accept_failures_unlogged,
    set_policy,
    stop_accepting,
    thread_ids,
)
from pricing_service.runtime.native_pump import BATCH, Pump

log = structlog.get_logger("pricing_service.runtime")

NAME = "native"
#: How often a drain looks for the moment nothing is in flight.
DRAIN_POLL_S = 0.001
#: How long nothing must have arrived, been in flight or been answered before a drain closes
#: the front: its ``close()`` drops answers its I/O threads have not written yet.
DRAIN_QUIET_S = 0.002
#: How long a drain serves new calls while it waits for that moment.
DRAIN_SERVE_S = 1.0
#: The least time between the drain's stop of accepting and the close: clients whose
#: connection the close ends reconnect at once, and those that did so right after the
#: listener's shutdown (within ~1 ms) could hang for seconds; 3 ms and 100 ms gaps showed none
#: (docs/benchmarks/runtimes.md "Drain").
DRAIN_MIN_S = 0.05

_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]


def refuse(settings: Settings) -> str | None:
    if settings.tls_cert_file or settings.tls_client_ca_file:
        return (
            "pygrpc-native has no TLS, and PRICING_TLS_CERT_FILE / PRICING_TLS_KEY_FILE / "
            "PRICING_TLS_CLIENT_CA_FILE ask for it; use PRICING_SERVER_RUNTIME=grpcio-aio for "
            "TLS, or terminate TLS in front of the server"
        )
    return None


class _Context:
    """The call's context as the pipeline and the servicers read it (``CallContext``)."""

    __slots__ = ("_deadline", "_metadata", "_peer")

    def __init__(
        self, metadata: tuple[tuple[str, str | bytes], ...], peer: str, remaining: float | None
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        self._deadline = None if remaining is None else time.monotonic() + remaining

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        deadline = self._deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def code(self) -> grpc.StatusCode | None:
        return None


class _Method:
    """One natively served unary method: the pipeline-wrapped handler and its codec."""

    __slots__ = ("deserialize", "invoke", "path", "serialize")

    def __init__(self, path: str, handler: grpc.RpcMethodHandler, invoke: Invoke) -> None:
        self.path = path
        self.invoke = invoke
        deserialize = tolerant(handler.request_deserializer)
        serialize = passing_bytes(handler.response_serializer)
        assert deserialize is not None and serialize is not None
        self.deserialize: Callable[[bytes], Any] = deserialize
        self.serialize: Callable[[Any], bytes] = serialize


class NativeServer:
    """The front, its fallback grpcio server, and the pump that feeds calls to the loop."""

    def __init__(self, parts: ServerParts) -> None:
        s = parts.settings
        self._parts = parts
        self._limit = s.max_message_bytes
        self._methods: list[_Method] = []
        self._paths: list[tuple[str, grpc.RpcMethodHandler]] = []
        for service, handlers in parts.methods.services.items():
            for name, handler in handlers.items():
                if handler.request_streaming or handler.response_streaming:
                    raise ValueError(f"/{service}/{name}: only unary methods are served natively")
                self._paths.append((f"/{service}/{name}", handler))
        before = thread_ids()
        try:
            self._front = NativeGrpcFront(
                s.listen,
                [],
                io_threads=s.native_io_threads,
                call_details=True,
                reuse_port=True,
                metrics=True,  # pricing_runtime_call_seconds (_FrontMetrics)
                # as grpc-core's server: keepalive pings only on connections with calls
                keepalive_permit_without_calls=False,
            )
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot listen on {s.listen}: {exc}") from exc
        self._port = self._front.bound_port
        #: the front's own threads (tokio's I/O workers), started by the constructor
        self._io_threads = thread_ids() - before
        self._calls: dict[int, asyncio.Task[None]] = {}
        #: calls taken from the front (each ends with one answer or failure, or its cancel)
        self._received = 0
        self._stopping = False
        self._fallback: grpc.aio.Server | None = None
        self._fallback_dir: str | None = None
        self._pump: Pump | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: answers waiting for the loop's next wait (loop pump), else None: answered at once
        self._answers: list[tuple[int, bytes]] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def start(self) -> None:
        parts = self._parts
        front = self._front
        self._loop = loop = asyncio.get_running_loop()
        self._fallback_dir = tempfile.mkdtemp(prefix="pricing-native-")
        path = os.path.join(self._fallback_dir, "fallback.sock")
        pipeline = parts.pipeline
        fallback = grpc.aio.server(
            interceptors=[ServerInterceptor.for_pipeline(pipeline)] if pipeline else [],
            options=[o for o in parts.grpc_options if o[0] != "grpc.so_reuseport"],
        )
        parts.add_grpcio_services(fallback)
        if fallback.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on the fallback socket {path}")
        await fallback.start()
        self._fallback = fallback
        front.set_fallback(path)
        ids = front.add_methods([(p, False) for p, _ in self._paths])
        table: list[_Method | None] = [None] * (max(ids) + 1 if ids else 0)
        for method_id, (p, handler) in zip(ids, self._paths, strict=True):
            invoke = (
                handler.unary_unary if pipeline is None else pipeline.wrap(p, handler.unary_unary)
            )
            table[method_id] = _Method(p, handler, invoke)
        self._methods = table  # type: ignore[assignment]  # every id the front returned is set
        if pipeline is not None:
            _FrontMetrics(front, pipeline.metrics.registry)
        self._pump = Pump(front, loop, self._on_events, self, parts.settings.native_pump)
        if pipeline is not None:
            _PumpMetrics(self._pump, pipeline.metrics.registry)
        if self._pump.mode == "loop":
            self._answers = []
        front.start()
        self._pump.start()
        if parts.settings.native_io_policy == "batch":
            set_policy(self._io_threads, batch=True)
        log.info(
            "native_runtime_started",
            port=self._port,
            pygrpc_native=NATIVE_VERSION,
            io_threads=parts.settings.native_io_threads,
            pump=self._pump.mode,
        )

    def _on_events(self, events: list[Any]) -> None:
        """Start a task per new call, cancel the tasks of calls the front ended (the client
        left, or the deadline passed). Runs on the loop."""
        front = self._front
        calls = self._calls
        methods = self._methods
        loop = self._loop
        assert loop is not None
        for kind, call_id, method_id, payload, _key, details in events:
            if kind == EVENT_CANCEL:
                task = calls.get(call_id)
                if task is not None:
                    task.cancel()
                continue
            self._received += 1
            if len(payload) > self._limit:
                front.fail(
                    call_id,
                    _RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({len(payload)} vs. {self._limit})",
                )
                continue
            metadata, peer, remaining = details
            calls[call_id] = loop.create_task(
                self._run(call_id, methods[method_id], payload, _Context(metadata, peer, remaining))
            )

    async def _run(self, call_id: int, method: _Method, payload: bytes, ctx: _Context) -> None:
        front = self._front
        try:
            result = await method.invoke(method.deserialize(payload), ctx)
            if result.__class__ is Failure:
                front.fail(
                    call_id, result.code.value[0], result.message, list(result.trailing_metadata)
                )
                return
            data = method.serialize(result)
            if len(data) > self._limit:
                front.fail(
                    call_id,
                    _RESOURCE_EXHAUSTED,
                    f"Sent message larger than max ({len(data)} vs. {self._limit})",
                )
                return
            out = self._answers
            if out is None:
                front.respond(call_id, data)
            else:  # loop pump: answered together when the loop next waits (Pump.select)
                out.append((call_id, data))
        except asyncio.CancelledError:
            if self._stopping:  # the grace period is over; a client that left gets nothing
                front.fail(call_id, _CANCELLED, "the server stopped before answering")
            raise
        except Exception:
            log.exception("rpc_internal_error", method=method.path)
            front.fail(call_id, _INTERNAL, INTERNAL_MESSAGE)
        finally:
            self._calls.pop(call_id, None)

    async def stop(self, grace: float | None) -> None:
        """Drain, then close: see :meth:`_idle_now`."""
        if self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        fallback = self._fallback
        fallback_stopped = asyncio.ensure_future(fallback.stop(grace)) if fallback else None
        deadline = loop.time() + (grace or 0.0)
        # answers written the moment they are handed over from here on: the I/O threads back
        # to the normal policy (under SCHED_BATCH they write when the loop next sleeps)
        set_policy(self._io_threads, batch=False)
        if self._pump is not None:
            await self._pump.quiesce()
        with accept_failures_unlogged():
            await self._drain_and_close(deadline)
        tasks = list(self._calls.values())  # only when the grace period ran out
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if fallback_stopped is not None:
            await fallback_stopped
        if self._fallback_dir is not None:
            shutil.rmtree(self._fallback_dir, ignore_errors=True)
        log.info("native_runtime_stopped", cancelled_after_grace=len(tasks))

    async def _drain_and_close(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        # new connections to the port's other servers from now on
        stopped = stop_accepting(self._port)
        # polled: the front has nothing to await. Every call is served until none has been
        # anywhere for DRAIN_QUIET_S; past DRAIN_SERVE_S without such a moment the drain
        # takes no new call, and closes once those in flight are answered
        started = quiet_since = loop.time()
        taking = True
        while (now := loop.time()) < deadline:
            if taking and now - started >= DRAIN_SERVE_S:
                taking = False
                if self._pump is not None:
                    self._pump.stop()
                log.info("native_runtime_drain_stops_taking", in_flight=len(self._calls))
            if not self._idle_now(take_new=taking):
                quiet_since = now
            elif now - quiet_since >= DRAIN_QUIET_S and now - started >= DRAIN_MIN_S:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        # nothing runs on the loop between the last look and the GOAWAY
        if taking and self._pump is not None:
            self._pump.stop()
        closing = time.time_ns() // 1_000_000
        self._front.close()
        closed = time.time_ns() // 1_000_000
        log.info("native_runtime_closing", at_ms=closing, in_flight=len(self._calls))
        log.info("native_runtime_closed", at_ms=closed, listeners_stopped=stopped)

    def _idle_now(self, *, take_new: bool = True) -> bool:
        """Whether nothing is in flight, queued in the front (when ``take_new``), or answered
        and not yet taken by the front's I/O threads.

        pygrpc-native 0.5 cannot stop taking new streams while it finishes the open ones: its
        ``close()`` sends GOAWAY and ends every open stream at once, and drops the answers its
        I/O threads have not taken yet (handed over, but not written). So the drain serves
        every call, new ones too, and closes the front once this has been true for
        :data:`DRAIN_QUIET_S` (a stream the front reads in the instant of the close is ended
        with UNAVAILABLE, one the client had not sent yet goes to another server), or when the
        grace period is over. Under load such a moment may not come: after
        :data:`DRAIN_SERVE_S` the drain stops taking calls (``take_new`` false) and closes once
        those in flight are answered; the calls then waiting in the front end with UNAVAILABLE
        at the close (at most one per caller waiting for its answer), where refusing them one
        by one would fail every call a client sends until the close.

        An answer counts as taken when the front's own metrics count the call's status (its
        I/O thread records it there, and writes the answer before it ends the connection):
        elapsed time alone is no proof on a busy core (measured: a 2 ms wait after the last
        hand-over still lost 8-10 answers in 400, the count none; docs/benchmarks/runtimes.md
        "Drain")."""
        answers = self._answers
        if answers:
            for call_id, data in answers:
                self._front.respond(call_id, data)
            answers.clear()
            return False
        if self._calls:
            return False
        if take_new:
            events = self._front.recv_batch_details(BATCH, 0)
            if events:
                self._on_events(events)
                return False
        counts = _front_counts(self._front)
        if counts is None:  # no metrics: the quiet time alone
            return True
        started, finished = counts
        # taking: nothing started that has not finished (none queued, none unwritten);
        # not taking, calls wait in the front: every call taken has finished there
        return started == finished if take_new else finished >= self._received


class _FrontMetrics(Collector):
    """``pricing_runtime_call_seconds{method, code}``: how long the front held each call, from
    its arrival to the answer's hand-over, read from the front's own histogram at scrape time.
    Beside ``pricing_rpc_latency_seconds`` (the pipeline's time) it shows the time a call waits
    to reach the event loop and to leave it: the runtime's share of the latency."""

    def __init__(self, front: NativeGrpcFront, registry: CollectorRegistry) -> None:
        self._front = front
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "pricing_runtime_call_seconds",
            "Native runtime: time from a call's arrival to its answer (queueing included)",
            labels=["method", "code"],
        )
        try:
            snapshot = self._front.metrics()
        except Exception:  # closed
            snapshot = None
        if snapshot:
            bounds = snapshot["bounds"]
            for path, method in snapshot["methods"].items():
                short = path.rsplit("/", 1)[-1]
                for code, series in method.get("status", {}).items():
                    total = 0.0
                    buckets = []
                    for bound, n in zip(bounds, series["buckets"], strict=False):
                        total += n
                        buckets.append((repr(float(bound)), total))
                    total = float(sum(series["buckets"]))
                    buckets.append(("+Inf", total))
                    name = _CODE_NAMES.get(code, str(code))
                    family.add_metric([short, name], buckets, series["sum"])
        yield family


class _PumpMetrics(Collector):
    """``pricing_native_pump_total{event}``: the loop's waits for I/O, the front's receives
    (and how many found nothing), the waits that could block; per request, they show what
    the arrival shape costs the loop."""

    def __init__(self, pump: Pump, registry: CollectorRegistry) -> None:
        self._pump = pump
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "pricing_native_pump",
            "Native runtime: the event loop's waits for I/O and receives from the front",
            labels=["event"],
        )
        for event, n in self._pump.counts.items():
            family.add_metric([event], n)
        yield family


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _front_counts(front: NativeGrpcFront) -> tuple[int, int] | None:
    """How many calls of our methods the front has started, and how many it has finished
    (counted on its I/O threads); None without its metrics."""
    metrics = front.metrics()
    if metrics is None:
        return None
    started = finished = 0
    for method in metrics["methods"].values():
        started += method["started"]
        finished += sum(status["count"] for status in method["status"].values())
    return started, finished


def build(parts: ServerParts) -> NativeServer:
    return NativeServer(parts)
