"""How calls reach the event loop on the native runtime (``PRICING_NATIVE_PUMP``).

``thread`` is how pygrpc-native's own asyncio adapter works: a Python thread blocks in the
front's ``recv_batch_details`` and hands every batch to the loop with ``call_soon_threadsafe``.
That thread needs the GIL for every batch while the loop holds it: CPython gives it over only
when the loop releases it, or after the switch interval (5 ms) by forcing it, and on a busy
core the thread then waits for the CPU too (measured: 230-440 us of run-queue wait per
request for that thread, docs/BENCHMARKS.md "Serving runtime").

``loop`` (the default) takes the thread out of the hot path. The loop's selector is wrapped
(:class:`PumpSelector`) so that each time the loop is about to wait for I/O it first hands the
answers of its last iteration to the front in one go (one wake-up of the front's I/O thread
instead of one per answer), then takes the calls that are ready itself with a non-blocking
receive (at most every :data:`BUSY_POLL_GAP_S` while it has work queued), and while calls are
in flight waits at most :data:`BUSY_POLL_S` before looking again. Only when no call is in
flight does the thread block in the front's receive for the loop (the GIL is free then: the
loop sleeps in ``epoll``); it hands over one batch and parks until the loop is next idle, so
it never holds calls while the loop is busy.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from pygrpc_native import NativeGrpcFront

log = structlog.get_logger("pricing_service.runtime")

#: Events taken from the front at a time (the loop serves its other work in between).
BATCH = 64
#: Longest wait for I/O before the loop looks for new calls again, while calls are in flight.
BUSY_POLL_S = 0.001
#: While the loop has work queued, it looks for new calls at most this often (a look that
#: finds none costs ~3 us; the loop iterates several times per call).
BUSY_POLL_GAP_S = 0.0002
#: The waker thread's receive timeout: how often it looks whether the loop still sleeps.
WAKER_TIMEOUT_MS = 20


class PumpedServer(Protocol):
    """What the pump reads of the server it feeds."""

    @property
    def in_flight(self) -> int: ...

    #: answers waiting for the loop's next wait (the pump hands them to the front)
    _answers: list[tuple[int, bytes]] | None


class Pump:
    """Moves call events from the front to the loop (see the module docstring)."""

    def __init__(
        self,
        front: NativeGrpcFront,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[Any]], None],
        server: PumpedServer,
        mode: str,
    ) -> None:
        self._front = front
        self._loop = loop
        self._deliver = deliver
        self._server = server
        self._closed = False
        self._draining = False
        self._polled_at = 0.0
        #: the loop's waits for I/O, the front's receives (of them empty), and the waits that
        #: could block (``pricing_native_pump_total``: per request, what a call shape costs)
        self.counts = {"waits": 0, "receives": 0, "receives_empty": 0, "blocking_waits": 0}
        # set: the waker thread may block in the front's receive for the loop
        self._gate = threading.Event()
        self._thread = threading.Thread(target=self._wake, name="native-waker", daemon=True)
        self._selector: PumpSelector | None = None
        inner = getattr(loop, "_selector", None)
        if mode == "loop" and not isinstance(inner, selectors.BaseSelector):
            log.warning("native_pump_fallback", reason="the event loop has no selector to wrap")
            mode = "thread"
        self.mode = mode
        if mode == "loop":
            assert isinstance(inner, selectors.BaseSelector)
            self._selector = PumpSelector(inner, self)

    def start(self) -> None:
        if self._selector is not None:
            self._loop._selector = self._selector  # type: ignore[attr-defined]
        else:
            self._gate.set()  # thread mode: the thread always receives
        self._thread.start()

    def stop(self) -> None:
        """Stop taking calls (the front is closed next)."""
        self._closed = True
        if self._selector is not None:
            self._loop._selector = self._selector.inner  # type: ignore[attr-defined]
        self._gate.set()  # let the thread reach the closed front and end

    def _safe_deliver(self, events: list[Any]) -> None:
        try:
            self._deliver(events)
        except Exception:
            log.exception("native_dispatch_failed")

    def select(self, inner: selectors.BaseSelector, timeout: float | None) -> list[Any]:
        """The loop's wait for I/O, taking ready calls first (loop mode)."""
        if self._closed:
            return inner.select(timeout)
        counts = self.counts
        counts["waits"] += 1
        front = self._front
        answers = self._server._answers
        if answers:
            # the iteration's answers in one go: one wake-up of the front's I/O thread
            for call_id, data in answers:
                front.respond(call_id, data)
            answers.clear()
        busy = timeout is not None and timeout <= 0
        now = time.monotonic()
        if busy and now - self._polled_at < BUSY_POLL_GAP_S:
            return inner.select(0)  # looked a moment ago: the loop's own work first
        self._polled_at = now
        counts["receives"] += 1
        events = front.recv_batch_details(BATCH, 0)
        if events:
            self._safe_deliver(events)
            return inner.select(0)
        counts["receives_empty"] += 1
        if busy:
            return inner.select(0)
        if self._server.in_flight or self._draining:
            # calls in flight: their replies are near; look for new calls again soon (and
            # always while draining: the thread no longer receives)
            counts["blocking_waits"] += 1
            return inner.select(BUSY_POLL_S if timeout is None else min(timeout, BUSY_POLL_S))
        counts["blocking_waits"] += 1
        # nothing in flight: sleep, and let the thread receive for us meanwhile
        self._gate.set()
        try:
            return inner.select(timeout)
        finally:
            self._gate.clear()

    async def quiesce(self) -> None:
        """End the thread, so that the loop alone takes calls from here on: a drain can then
        tell exactly when none is left anywhere. Calls the thread took before it ended reach
        the loop before this returns (its hand-over is queued first)."""
        self._draining = True
        self._gate.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _wake(self) -> None:
        """The waker thread: receives only while the gate is open (the loop sleeps)."""
        front, loop = self._front, self._loop
        thread_mode = self._selector is None
        while True:
            self._gate.wait()
            if self._draining:
                return
            events = front.recv_batch_details(BATCH, WAKER_TIMEOUT_MS)
            if events is None or self._closed:
                return  # the front is closed
            if not events:
                continue
            if not thread_mode:
                self._gate.clear()  # one batch per sleep: the loop takes the next ones itself
            try:
                loop.call_soon_threadsafe(self._safe_deliver, events)
            except RuntimeError:  # the loop is closed
                return


class PumpSelector(selectors.BaseSelector):
    """The loop's selector, with :meth:`Pump.select` in front of its ``select``."""

    def __init__(self, inner: selectors.BaseSelector, pump: Pump) -> None:
        self.inner = inner
        self._pump = pump

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        return self._pump.select(self.inner, timeout)

    def close(self) -> None:
        self.inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Any:
        return self.inner.get_map()
