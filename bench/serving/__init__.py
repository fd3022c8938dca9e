"""Serving benchmark (``python -m bench.serving``; its ``--help`` and :mod:`.cli` describe the
run): BatchGetLowestPrice of the real server on each server runtime against no-op gRPC echo
servers, in one run and one harness (:mod:`bench.harness`). One module per phase:

* :mod:`.state`: what the phases share (:class:`Run`, the results, the figures' constants);
* :mod:`.prepare`: the processes' environment, the settings and the data (phase 1);
* :mod:`.server`: the real server per runtime, its curve and checks (phase 2);
* :mod:`.echo`: the echoes and the floor (phases 3 and 4);
* :mod:`.rounds`: ``--rounds`` (phase 5);
* :mod:`.report`: the figures, the summary lines, the plot;
* :mod:`.cli`: the options and the order of the phases.

The data and the answer checks (``bench.serving_data``) are re-exported here for
``bench.hotpath``, ``bench.pump`` and the unit tests.
"""

from __future__ import annotations

from bench.harness import percentile
from bench.serving.cli import main, run
from bench.serving.prepare import otel_env, prepare
from bench.serving.server import measure_server
from bench.serving.state import Run, _median
from bench.serving_data import (
    BUYER,
    CURRENCY,
    ITEMS_PER_SELLER,
    NAMESPACE,
    OTHER_BUYERS,
    PAGE_SELLERS,
    SELLERS,
    Catalog,
    DegradedAnswer,
    call_once,
    catalog,
    check_answer,
    expected_answer,
    grpc_frame,
    load_data,
    page,
    page_fields,
    request_bytes,
    verified_call,
)

__all__ = [  # the data and the answer checks, for bench.hotpath, bench.pump and the unit tests
    "BUYER",
    "CURRENCY",
    "ITEMS_PER_SELLER",
    "NAMESPACE",
    "OTHER_BUYERS",
    "PAGE_SELLERS",
    "SELLERS",
    "Catalog",
    "DegradedAnswer",
    "Run",
    "_median",
    "call_once",
    "catalog",
    "check_answer",
    "expected_answer",
    "grpc_frame",
    "load_data",
    "main",
    "measure_server",
    "otel_env",
    "page",
    "page_fields",
    "percentile",
    "prepare",
    "request_bytes",
    "run",
    "verified_call",
]
