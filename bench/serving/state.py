"""What the serving benchmark's phases share: the run's settings, data, harness and
processes' placement (:class:`Run`), each runtime's results, the figures' constants."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Harness, Point, median
from bench.serving_data import Catalog
from pricing_testing.redis_server import RedisServer

REFERENCE_RUNTIME = "grpcio-aio"  # ratio_to_echo's fixed reference
#: ``--otel``: the servers' sampler (``OTEL_TRACES_SAMPLER``, ``_ARG``); h2load sends no
#: ``traceparent``, so every call is a root sampled at the ratio.
OTEL_MODES: dict[str, tuple[str, str] | None] = {
    "off": None,
    "1%": ("parentbased_traceidratio", "0.01"),
    "100%": ("parentbased_always_on", ""),
}
P99_TARGET_MS = 5.0
HARNESS_ALLOWANCE_MS = 2.0  # over the echo's p99 at the same rate, where 5 ms cannot be shown


def _median(values: Sequence[float | None]) -> float | None:
    return median(values)


@dataclass
class Run:
    """Everything the phases share: settings, data, harness, processes' placement."""

    args: argparse.Namespace
    workdir: Path
    redis: RedisServer
    harness: Harness
    env: dict[str, str]
    settings: Any
    cat: Catalog
    server_cpus: str | None
    bodies: dict[int, Path] = field(default_factory=dict)
    requests: dict[int, bytes] = field(default_factory=dict)
    expected: dict[int, list[tuple[str, int, str]]] = field(default_factory=dict)
    #: the real answer of the page (the echoes answer these bytes)
    response: bytes = b""
    problems: list[str] = field(default_factory=list)

    @property
    def redis_pid(self) -> int | None:
        return self.redis.proc.pid if self.redis.proc else None


@dataclass
class ServerResult:
    """One runtime's server measurements."""

    runtime: str
    peak: Point
    points: dict[float, Point]
    paced: Point | None = None
    scaling: Point | None = None
    checks: dict[str, float] = field(default_factory=dict)
    #: ``--paced-fractions`` other than 0.7: paced points at those fractions of the peak
    paced_more: dict[float, Point] = field(default_factory=dict)


@dataclass
class EchoResult:
    runtime: str
    peak: Point
    points: dict[float, Point]
    #: paced at the server's own 70 % rate on this runtime: the harness's p99 there
    paced_at_server_rate: Point | None = None
    #: paced at the server's other ``--paced-fractions`` rates
    paced_more: dict[float, Point] = field(default_factory=dict)


def paced_fractions(args: argparse.Namespace) -> list[float]:
    """``--paced-fractions`` other than 0.7 (which is always measured)."""
    raw = getattr(args, "paced_fractions", "0.7")
    return sorted({float(x) for x in raw.split(",") if x} - {0.7})
