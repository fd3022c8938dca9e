"""The benchmarks' statistics: one definition of each, so that figures are comparable across
benchmarks.

* :func:`percentile` is the nearest-rank percentile: the value at rank ``ceil(q/100 * n)`` of
  the sorted values (``q`` in 0..100);
* :func:`median` of the known values, for medians of ratios over rounds;
* :func:`bucket_quantile` of a Prometheus histogram, as ``histogram_quantile`` interpolates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values`` (in any order); NaN of nothing."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return float(ordered[k])


def median(values: Sequence[float | None]) -> float | None:
    """The median of the known values (None of none), rounded to 3 places when averaged."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else round((known[mid - 1] + known[mid]) / 2, 3)


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a cumulative histogram ``[(upper bound, count), ...]``
    (``+Inf`` last), interpolated linearly inside its bucket as Prometheus'
    ``histogram_quantile`` does; None when empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound
