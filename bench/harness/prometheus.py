"""The servers' Prometheus endpoints: every sample scraped, a histogram's buckets summed over
processes, the observations between two readings."""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence

Samples = list[tuple[str, dict[str, str], float]]


def scrape(ports: Sequence[int]) -> Samples:
    """Every sample of every ``/metrics`` endpoint on ``ports`` (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    out: Samples = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            out += [(s.name, dict(s.labels), s.value) for s in fam.samples]
    return out


def histogram(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """The cumulative buckets of histogram ``name`` summed over the series matching
    ``labels`` (over every process scraped): ``[(le, count), ...]``, ``+Inf`` last."""
    sums: dict[float, float] = {}
    for sample, sample_labels, value in samples:
        if sample != f"{name}_bucket":
            continue
        if any(sample_labels.get(k) != v for k, v in labels.items()):
            continue
        le = float(sample_labels["le"])
        sums[le] = sums.get(le, 0.0) + value
    return sorted(sums.items())


def histogram_delta(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The observations between two readings of the same histogram."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]
