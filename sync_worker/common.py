"""Small facts and helpers shared by the snapshot loader, the list loader and the stream consumer
(no I/O). The id rule is the server's: :func:`pricing_service.ids.id_problem`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

#: How far a fact's time may be later than the reference time (a snapshot's cut, the worker's
#: clock for an event): the clocks of the exporting and producing systems.
CLOCK_SKEW_MS: Final = 5 * 60 * 1000
#: The end of the UNAVAILABLE message of a load that gave up during a Redis outage.
RESUME_HINT: Final = "run the load again to resume from the last checkpoint"


class TimeFormatError(ValueError):
    """A timestamp is not RFC 3339 with an explicit offset."""


def parse_rfc3339_ms(text: str) -> int:
    """UTC milliseconds of an RFC 3339 timestamp (``2025-01-02T03:04:05.123Z``).

    A date-time without an offset (``Z`` or ``+hh:mm``) is refused: it would be read in the
    machine's local time zone.
    """
    if len(text) < 20 or text[10] not in "Tt ":
        raise TimeFormatError(f"not an RFC 3339 date-time: {text!r}")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise TimeFormatError(f"not an RFC 3339 date-time: {text!r}") from None
    if dt.tzinfo is None:
        raise TimeFormatError(f"RFC 3339 date-time without an offset: {text!r}")
    return round(dt.timestamp() * 1_000_000) // 1000


def format_rfc3339_ms(ms: int) -> str:
    """``2025-01-02T03:04:05.123Z`` for UTC milliseconds."""
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
