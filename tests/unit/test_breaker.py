from __future__ import annotations

from pricing_service.breaker import CircuitBreaker


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_threshold_and_probes_once_per_interval() -> None:
    t = FakeTime()
    changes: list[bool] = []
    b = CircuitBreaker(3, 1.0, on_change=changes.append, monotonic=t)
    for _ in range(2):
        b.failure()
    assert b.allow() and not b.is_open
    b.failure()
    assert b.is_open and changes == [True]
    assert not b.allow()
    t.t = 1.0
    assert b.allow()  # the probe
    assert not b.allow()  # only one per interval
    b.failure()
    t.t = 1.5
    assert not b.allow()
    t.t = 2.1
    assert b.allow()
    b.success()
    assert not b.is_open and changes == [True, False]
    assert b.allow()


def test_calls_in_flight_when_a_failure_was_counted_are_the_same_incident() -> None:
    t = FakeTime()
    b = CircuitBreaker(3, 1.0, monotonic=t)
    # one stall: 16 lookups started together, all time out together
    starts = [b.now() for _ in range(16)]
    t.t = 0.05
    for s in starts:
        b.failure(s)
    assert not b.is_open and b.allow()  # one failure, not 16
    # an outage: every round of calls starts after the last failure and fails again
    for _ in range(2):
        t.t += 0.01
        s = b.now()
        t.t += 0.05
        b.failure(s)
        b.failure(starts[0])  # a straggler of the first stall never counts
    assert b.is_open
    # a failure without a start mark always counts (callers that do not track it)
    c = CircuitBreaker(2, 1.0, monotonic=t)
    c.failure()
    c.failure()
    assert c.is_open
