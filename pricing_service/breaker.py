"""A small circuit breaker so a Redis outage does not make every request wait for a timeout."""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    """closed -> (``threshold`` consecutive failures) -> open -> (``reset_s``) -> half-open.

    While open, :meth:`allow` is false except for one probe every ``reset_s``; a success closes
    the breaker. ``on_change(open)`` is called on every transition (logs, metrics).

    Failures are counted per incident, not per caller: a call that was already in flight when
    an earlier failure was counted (pass its :meth:`now` at start to :meth:`failure`) belongs
    to the same incident and does not count again. One 50 ms stall that fails 16 concurrent
    lookups is one failure, not 16 (which would open the breaker and degrade a whole reset
    interval of answers for a hiccup); an outage still opens it after ``threshold`` successive
    rounds of failing calls.
    """

    def __init__(
        self,
        threshold: int,
        reset_s: float,
        *,
        on_change: Callable[[bool], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._reset_s = reset_s
        self._failures = 0
        self._counted_at = float("-inf")  # when the last counted failure was recorded
        self._open_until = 0.0
        self._open = False
        self._on_change = on_change
        self._now = monotonic

    @property
    def is_open(self) -> bool:
        return self._open

    def allow(self) -> bool:
        if not self._open:
            return True
        now = self._now()
        if now >= self._open_until:
            self._open_until = now + self._reset_s  # one probe per interval
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        if self._open:
            self._open = False
            if self._on_change is not None:
                self._on_change(False)

    def now(self) -> float:
        """The breaker's clock: a caller's start mark for :meth:`failure`."""
        return self._now()

    def failure(self, started: float | None = None) -> None:
        """A failed call; ``started`` is :meth:`now` when it began (None: always counted)."""
        if started is not None and started < self._counted_at:
            return  # in flight when a failure of the same incident was counted
        self._counted_at = self._now()
        self._failures += 1
        if self._failures >= self._threshold:
            self._open_until = self._now() + self._reset_s
            if not self._open:
                self._open = True
                if self._on_change is not None:
                    self._on_change(True)
