"""What the benchmarks share: percentiles, CPU time from ``/proc``, server processes, the h2load
driver and its load points, the Prometheus scrape, the plot. Every benchmark takes these from
here and defines none of its own, so that figures are comparable across benchmarks:

* :mod:`.stats`: :func:`percentile` is the nearest-rank percentile (the value at rank
  ``ceil(q/100 * n)``), :func:`median`, :func:`bucket_quantile` (Prometheus' interpolation);
* :mod:`.proc`: CPU time is user + system from ``/proc/<pid>/stat`` (:func:`cpu_seconds`), a
  process tree's from all its processes (:class:`ServerProcess`), the load generator's from the
  rusage of the waited-for children (:func:`children_cpu_seconds`), a core's busy share from
  ``/proc/stat`` (:func:`core_times`), resident memory from ``/proc/<pid>/status``
  (:func:`rss_kb`), Redis's own from ``INFO cpu`` (:func:`redis_cpu_seconds`);
* :mod:`.servers`: child server processes, CPU pinning, free ports, log line counts;
* :mod:`.prometheus`: the servers' ``/metrics`` and their histograms;
* :mod:`.h2load`: the h2load driver (:class:`Harness`) and its load points (:class:`Point`);
* :mod:`.plot`: latency against throughput.

The private Redis servers and the processes of the real programs are
:mod:`pricing_testing`'s, shared with the test suite.
"""

from __future__ import annotations

from bench.harness.h2load import PACED_CLIENT_RPS, Harness, Point, ServerStats, report
from bench.harness.plot import plot
from bench.harness.proc import (
    TICKS,
    children_cpu_seconds,
    core_busy,
    core_times,
    cpu_seconds,
    max_rss_kb,
    redis_cpu_seconds,
    rss_kb,
    self_cpu_seconds,
    thread_delta,
    thread_times,
)
from bench.harness.prometheus import Samples, histogram, histogram_delta, scrape
from bench.harness.servers import (
    ServerProcess,
    count_log_lines,
    free_port,
    free_port_block,
    pin_running,
    pinned,
)
from bench.harness.stats import bucket_quantile, median, percentile

__all__ = [
    "PACED_CLIENT_RPS",
    "TICKS",
    "Harness",
    "Point",
    "Samples",
    "ServerProcess",
    "ServerStats",
    "bucket_quantile",
    "children_cpu_seconds",
    "core_busy",
    "core_times",
    "count_log_lines",
    "cpu_seconds",
    "free_port",
    "free_port_block",
    "histogram",
    "histogram_delta",
    "max_rss_kb",
    "median",
    "percentile",
    "pin_running",
    "pinned",
    "plot",
    "redis_cpu_seconds",
    "report",
    "rss_kb",
    "scrape",
    "self_cpu_seconds",
    "thread_delta",
    "thread_times",
]
