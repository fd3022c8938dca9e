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
