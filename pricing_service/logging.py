"""structlog, configured once per process: JSON off a terminal, console on one.

The standard library's loggers (asyncio, psycopg, grpc, redis, ``warnings``) go through the
same processors and renderer (structlog's ``ProcessorFormatter`` on the root logger), so every
line a process writes is one JSON object off a terminal: ``event`` is the message, ``logger``
the stdlib logger's name, exceptions a ``exception`` field.

The JSON path is on every RPC (the canonical ``rpc_finished`` line), so it is kept cheap:
orjson renders, and the timestamp reuses the formatted second (measured with
``bench.hotpath`` and py-spy: this halved the cost of the line). The canonical line itself
skips structlog's processor chain (:class:`CanonicalLine`, 13.8 -> ~3 us per RPC): the same
JSON object (the context variables, ``level``, ``timestamp``, the fields, ``event``) written by
one function, wherever this configuration would write an INFO line as JSON.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal, TextIO

import orjson
import structlog


def configure_logging(
    level: str = "INFO",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger (call once, from ``__main__``).

    Lines go to ``stream`` (default: standard error).
    """
    out = sys.stderr if stream is None else stream
    use_console = out.isatty() if fmt == "auto" else fmt == "console"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        utc_timestamp,
    ]
    renderer: structlog.typing.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    processors = [*shared, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # One write() per line ("message\n" together): print() writes the message and the
        # newline separately, which on unbuffered stderr (PYTHONUNBUFFERED=1, as in the image)
        # interleaves the lines of workers sharing the stream into corrupt JSON.
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # warnings.warn(...) -> the "py.warnings" logger -> JSON (off, then on: installs the hook
    # again even where something replaced warnings.showwarning since an earlier call)
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    global _canonical, _installed  # noqa: PLW0603 - configured once per process, like structlog
    enabled = logging.getLevelName(level) <= logging.INFO
    _canonical = CanonicalLine(out) if enabled and not use_console else None
    _installed = processors


class CanonicalLine:
    """Writes an INFO line as this module's JSON configuration does, without structlog's
    processor chain: for the one line every RPC writes (``rpc_finished``)."""

    def __init__(self, out: TextIO) -> None:
        self._write = out.write
        self._flush = out.flush

    def info(self, event: str, **fields: Any) -> None:
        line = structlog.contextvars.get_contextvars()  # merge_contextvars
        line.update(fields)
        line["event"] = event
        line["level"] = "info"  # add_log_level
        utc_timestamp(None, "info", line)
        self._write(_orjson_dumps(line) + "\n")  # one write per line (see configure_logging)
        self._flush()


_canonical: CanonicalLine | None = None
_installed: list[structlog.typing.Processor] | None = None


def canonical_line() -> CanonicalLine | None:
    """The fast writer of this module's JSON configuration while it is structlog's current
    one, else None (console, level above INFO, not configured, or configured otherwise since:
    then log through structlog). Cheap enough to ask per call (~0.3 us)."""
    line = _canonical
    if line is None or structlog.get_config()["processors"] is not _installed:
        return None
    return line


_second: list[Any] = [-1, ""]  # [epoch second, its "YYYY-MM-DDTHH:MM:SS" form]


def utc_timestamp(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """``timestamp``: ISO 8601 UTC with milliseconds (``2026-11-25T14:52:48.123Z``).

    The same form as ``TimeStamper(fmt="iso", utc=True)`` at millisecond precision, with the
    date and time of the current second formatted once per second instead of once per line.
    """
    now = time.time()
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        cached[0] = sec
    event_dict["timestamp"] = f"{cached[1]}.{int((now - sec) * 1000):03d}Z"
    return event_dict


def _orjson_dumps(obj: Any, **kw: Any) -> str:
    """structlog's JSON serializer: orjson, objects it cannot encode as their ``repr``."""
    data: bytes = orjson.dumps(obj, default=repr, option=orjson.OPT_NON_STR_KEYS)
    return data.decode()
