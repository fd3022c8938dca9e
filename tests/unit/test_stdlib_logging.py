"""Standard-library loggers (asyncio, psycopg, grpc, warnings) come out as the same JSON lines
as structlog's own: one object per line, with level, logger, event and timestamp."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from pricing_service.logging import configure_logging


@pytest.fixture
def restore() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # each line alone is JSON


@pytest.mark.usefixtures("restore")
def test_stdlib_records_are_json_lines() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "<Task>", 0.25)
    logging.getLogger("psycopg.pool").warning("error connecting in %r", "pool-1")
    logging.getLogger("grpc._cython.cygrpc").info("channel closed")
    logging.getLogger("noisy").debug("below the level: dropped")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a deprecated thing", DeprecationWarning, stacklevel=1)
    structlog.get_logger("pricing_service").info("own_event", n=1)

    got = lines(out)
    assert [(g.get("logger"), g["level"]) for g in got] == [
        ("asyncio", "warning"),
        ("psycopg.pool", "warning"),
        ("grpc._cython.cygrpc", "info"),
        ("asyncio", "error"),
        ("py.warnings", "warning"),
        (None, "info"),  # structlog's own line (no logger name processor on the fast path)
    ]
    assert got[0]["event"] == "Executing <Task> took 0.250 seconds"
    assert got[1]["event"] == "error connecting in 'pool-1'"
    assert "ValueError: boom" in str(got[3]["exception"])
    assert "Traceback" in str(got[3]["exception"])
    assert "a deprecated thing" in str(got[4]["event"])
    assert got[5]["event"] == "own_event" and got[5]["n"] == 1
    for g in got:
        assert str(g["timestamp"]).endswith("Z")


@pytest.mark.usefixtures("restore")
def test_console_format_on_request_is_not_json() -> None:
    out = io.StringIO()
    configure_logging("INFO", "console", stream=out)
    logging.getLogger("asyncio").warning("plain %s", "text")
    text = out.getvalue()
    assert "plain text" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


@pytest.mark.usefixtures("restore")
def test_configuring_twice_leaves_one_handler() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    configure_logging("INFO", "json", stream=out)
    logging.getLogger("asyncio").warning("once")
    assert len(lines(out)) == 1
