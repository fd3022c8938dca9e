from __future__ import annotations

from pricing_service.ratelimit import RateLimiter, caller_identity


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_burst_then_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(10, 3, monotonic=clock)
    assert [limiter.allow("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.allow("a")
    assert 0.09 < wait <= 0.1
    assert limiter.allow("b") == 0.0  # callers are independent
    clock.t += 0.11
    assert limiter.allow("a") == 0.0
    assert limiter.allow("a") > 0


def test_refused_calls_do_not_dig_a_hole() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 1, monotonic=clock)
    assert limiter.allow("a") == 0.0
    for _ in range(100):
        assert limiter.allow("a") > 0
    clock.t += 1.0
    assert limiter.allow("a") == 0.0


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(1, 1, max_callers=50)
    for i in range(1000):
        limiter.allow(f"c{i}")
    assert len(limiter) == 50


def test_identity_prefers_the_token_over_the_peer() -> None:
    a = caller_identity([("authorization", "Bearer x")], "ipv4:10.0.0.1:5000")
    b = caller_identity([("authorization", "Bearer x")], "ipv4:10.0.0.2:6000")
    c = caller_identity([], "ipv4:10.0.0.1:5000")
    d = caller_identity([], "ipv4:10.0.0.1:7000")
    assert a == b and a.startswith("token:")
    assert c == d == "peer:ipv4:10.0.0.1"
    assert caller_identity(None, "ipv6:[::1]:5000") == "peer:ipv6:[::1]"
