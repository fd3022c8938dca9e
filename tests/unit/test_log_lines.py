"""Each JSON log line reaches the stream in one write, so workers sharing stderr never interleave.

With unbuffered stderr (``PYTHONUNBUFFERED=1``, as in the image) ``print()`` writes the message
and the newline separately: lines of several ``--workers`` processes came out spliced into
invalid JSON (found by ``bench.serving``'s one-line-per-RPC check).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from pricing_service.logging import configure_logging


class Recorder:
    """A stream that remembers every write call."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.fixture
def restore() -> Iterator[None]:
    root_handlers = list(logging.getLogger().handlers)
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = root_handlers


def configure_into(monkeypatch: pytest.MonkeyPatch, level: str) -> Recorder:
    """configure_logging with stderr replaced (inside the test: pytest swaps stderr around it)."""
    rec = Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    configure_logging(level, "json")
    monkeypatch.undo()
    return rec


def test_one_write_per_json_line(monkeypatch: pytest.MonkeyPatch, restore: None) -> None:
    stream = configure_into(monkeypatch, "INFO")
    log = structlog.get_logger("test")
    log.info("rpc_finished", method="/pricing.v1.PricingService/BatchGetLowestPrice", code="OK")
    log.warning("membership_degraded", cause="timeout")
    assert len(stream.writes) == 2
    for w in stream.writes:
        assert w.endswith("\n") and w.count("\n") == 1
        json.loads(w)
    assert json.loads(stream.writes[0])["event"] == "rpc_finished"


def test_filtered_level_writes_nothing(monkeypatch: pytest.MonkeyPatch, restore: None) -> None:
    stream = configure_into(monkeypatch, "WARNING")
    structlog.get_logger("test").info("rpc_finished")
    assert stream.writes == []


class _Context:
    """The part of a grpc.aio ServicerContext the interceptor reads on success."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


async def test_canonical_line_carries_the_request_id(
    monkeypatch: pytest.MonkeyPatch, restore: None
) -> None:
    """The caller's ``x-request-id`` when it sends one; otherwise a fresh id per call, distinct
    across interceptors (one per worker process) too; nothing left bound after the call."""
    from pricing_service import interceptors  # noqa: PLC0415
    from pricing_service.metrics import Metrics  # noqa: PLC0415

    stream = configure_into(monkeypatch, "INFO")
    # the module's logger may have been cached under another configuration by an earlier test
    monkeypatch.setattr(interceptors, "log", structlog.get_logger("pricing_service.rpc"))

    async def handler(request: object, context: object) -> str:
        return "answer"

    method = "/pricing.v1.PricingService/BatchGetLowestPrice"
    calls = [
        interceptors.ServerInterceptor(Metrics(), max_concurrent_rpcs=10)._wrap(method, handler)
        for _ in range(2)
    ]
    assert await calls[0](object(), _Context((("x-request-id", "req-from-caller"),))) == "answer"
    for call in calls:
        for _ in range(3):
            await call(object(), _Context(()))
    lines = [json.loads(w) for w in stream.writes]
    assert [line["event"] for line in lines] == ["rpc_finished"] * 7
    assert all(line["code"] == "OK" and line["method"] == method for line in lines)
    assert lines[0]["request_id"] == "req-from-caller"
    generated = [line["request_id"] for line in lines[1:]]
    assert len(set(generated)) == 6
    assert all(len(r) == 32 and int(r, 16) >= 0 for r in generated)
    assert "request_id" not in structlog.contextvars.get_contextvars()  # reset after each call


def test_the_canonical_line_is_the_line_structlog_writes(
    monkeypatch: pytest.MonkeyPatch, restore: None
) -> None:
    """The fast writer of the per-RPC line (no processor chain) writes the same JSON object as
    ``log.info`` under the same configuration: context variables, fields, event, level, a
    timestamp of the same form; one write per line. Not there on a console or above INFO."""
    from pricing_service.logging import canonical_line  # noqa: PLC0415

    stream = configure_into(monkeypatch, "INFO")
    line = canonical_line()
    assert line is not None
    tokens = structlog.contextvars.bind_contextvars(request_id="r-1", rpc="BatchGetLowestPrice")
    try:
        fields = {"method": "/pricing.v1.PricingService/BatchGetLowestPrice", "code": "OK",
                  "duration_ms": 1.25, "reason": "X"}  # fmt: skip
        structlog.get_logger("pricing_service.rpc").info("rpc_finished", **fields)
        line.info("rpc_finished", **fields)
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
    assert len(stream.writes) == 2 and all(w.count("\n") == 1 for w in stream.writes)
    slow, fast = (json.loads(w) for w in stream.writes)
    assert slow.pop("timestamp")[:16] == fast.pop("timestamp")[:16]  # same minute, same form
    assert slow == fast
    assert fast["request_id"] == "r-1" and fast["level"] == "info"
    configure_into(monkeypatch, "WARNING")
    assert canonical_line() is None
    monkeypatch.setattr(sys, "stderr", Recorder())
    configure_logging("INFO", "console")
    monkeypatch.undo()
    assert canonical_line() is None
