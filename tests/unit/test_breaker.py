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
