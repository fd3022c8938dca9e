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
``close()`` ends open streams and drops answers not yet written), so a drain serves every call
until none has been in flight for a few milliseconds (:meth:`NativeServer._idle_now`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog
from prometheus_client.core import HistogramMetricFamily, Metric
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

_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
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
        before = _thread_ids()
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
        self._io_threads = _thread_ids() - before
        self._calls: dict[int, asyncio.Task[None]] = {}
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
        if self._pump.mode == "loop":
            self._answers = []
        front.start()
        self._pump.start()
        if parts.settings.native_io_policy == "batch":
            _set_policy(self._io_threads, batch=True)
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
        _set_policy(self._io_threads, batch=False)
        if self._pump is not None:
            await self._pump.quiesce()
        # polled: the front has nothing to await. First every call is served until none has
        # been anywhere for DRAIN_QUIET_S; past DRAIN_SERVE_S without such a moment, new calls
        # are refused (UNAVAILABLE) while those in flight finish
        started = quiet_since = loop.time()
        while (now := loop.time()) < deadline:
            refuse = now - started >= DRAIN_SERVE_S
            if not self._idle_now(refuse_new=refuse):
                quiet_since = now
            elif now - quiet_since >= DRAIN_QUIET_S:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        # nothing runs on the loop between the last look and the GOAWAY
        if self._pump is not None:
            self._pump.stop()
        log.info("native_runtime_closing", at_ms=time.time_ns() // 1_000_000,
                 in_flight=len(self._calls))  # fmt: skip
        with _stderr_silenced():
            # the port's listener first: a client that reconnects after the GOAWAY must reach
            # the port's other servers, not this closing listener (it accepted connections
            # and dropped them; those calls then waited out the client's reconnect backoff)
            stopped = _stop_listening(self._port)
            self._front.close()
        log.info("native_runtime_closed", at_ms=time.time_ns() // 1_000_000,
                 listeners_stopped=stopped)  # fmt: skip
        tasks = list(self._calls.values())  # only when the grace period ran out
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if fallback_stopped is not None:
            await fallback_stopped
        if self._fallback_dir is not None:
            shutil.rmtree(self._fallback_dir, ignore_errors=True)
        log.info("native_runtime_stopped", cancelled_after_grace=len(tasks))

    def _idle_now(self, *, refuse_new: bool = False) -> bool:
        """Whether nothing is in flight, queued in the front, or answered just now.

        pygrpc-native 0.5 cannot stop taking new streams while it finishes the open ones: its
        ``close()`` sends GOAWAY and ends every open stream at once, answers its I/O threads
        have not written yet included. So the drain serves every call, new ones too, and closes
        the front once this has been true for :data:`DRAIN_QUIET_S` (the last answers are
        written by then; a call that reaches the front in the instant of the close is refused,
        one the client had not sent yet goes to another server), or when the grace period is
        over. Under load such a moment may not come: after :data:`DRAIN_SERVE_S` new calls are
        refused with UNAVAILABLE (``refuse_new``) so that those in flight can finish."""
        answers = self._answers
        if answers:
            for call_id, data in answers:
                self._front.respond(call_id, data)
            answers.clear()
            return False
        if self._calls:
            return False
        events = self._front.recv_batch_details(BATCH, 0)
        if events and refuse_new:
            for kind, call_id, *_ in events:
                if kind != EVENT_CANCEL:
                    self._front.fail(call_id, _UNAVAILABLE, "the server is shutting down")
            return False
        if events:
            self._on_events(events)
            return not self._calls  # (cancellations only)
        return True


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


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _stop_listening(port: int) -> int:
    """Stop this process's listening TCP sockets on ``port`` (``shutdown``: the kernel takes
    them out of the port's ``SO_REUSEPORT`` group at once, so new connections go to the other
    servers on the port; open connections are not touched). pygrpc-native offers no call for
    it. Returns how many were stopped (0 where ``/proc`` is not there)."""
    stopped = 0
    seen: set[str] = set()
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:") or target in seen:
            continue
        seen.add(target)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                if sock.getsockname()[1] != port:
                    continue
                with contextlib.suppress(OSError):  # Linux answers ENOTCONN, and stops it
                    sock.shutdown(socket.SHUT_RD)
                stopped += 1
            except OSError:
                continue
    return stopped


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Standard error (fd 2) to /dev/null for a moment: pygrpc-native's accept loop prints a
    plain-text line (not JSON) when its listener goes away during the close."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _thread_ids() -> set[int]:
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:  # not Linux
        return set()


def _set_policy(tids: set[int], *, batch: bool) -> None:
    """``SCHED_BATCH`` (or back to ``SCHED_OTHER``) for the front's I/O threads: under it Linux
    does not let an I/O thread preempt the event loop's thread each time an answer wakes it (it
    runs when the loop waits, or on another core), so the answers of one loop iteration cost
    one wake-up, not one each (see the module docstring)."""
    policy = getattr(os, "SCHED_BATCH" if batch else "SCHED_OTHER", None)
    if policy is None or not tids:
        log.info("native_io_policy_unavailable", threads=len(tids))
        return
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError as exc:  # a thread that ended, or a sandbox that forbids it
            log.warning("native_io_policy_failed", thread=tid, error=str(exc))


def build(parts: ServerParts) -> NativeServer:
    return NativeServer(parts)
