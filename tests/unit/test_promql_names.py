"""The PromQL name extraction the alert/dashboard test relies on."""

from __future__ import annotations

from tests.support.promql import metric_names


def test_names_not_functions_labels_keywords_or_durations() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (method, le) (rate(a_seconds_bucket{method=~"X|Y"}'
        "[$__rate_interval]))) > 0.1 and on (instance) b_total offset 6h > 1.25 * "
        '(c_bytes{job="pricing-service"} offset 6h) unless up{job="x"} == 0 or d:rule 1e6'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c_bytes", "d:rule"}
