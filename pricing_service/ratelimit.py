"""Per-caller request rate bound: a token bucket per caller identity."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

#: Callers remembered at most (least recently seen forgotten first): bounded memory.
MAX_CALLERS = 10_000


def caller_identity(metadata: Iterable[tuple[str, str | bytes]] | None, peer: str) -> str:
    """Who is calling: the bearer token's fingerprint when there is one, else the peer host."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            digest = hashlib.sha256(value.encode()).hexdigest()[:12]
            return f"token:{digest}"
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer  # ipv4:1.2.3.4:5678
    return f"peer:{host}"


class RateLimiter:
    """``rate`` requests per second per caller, bursts of up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        max_callers: int = MAX_CALLERS,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._now = monotonic
        self._max = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, caller: str) -> float:
        """0.0 if the call may proceed, else the seconds until it could."""
        now = self._now()
        tokens, last = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[caller] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
