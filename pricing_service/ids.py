"""The id rule shared by the server and the sync worker (no I/O, no imports).

An id (buyer, seller, item, crowd, event source) is non-empty, at most ``max_len`` characters
and printable (no control characters). :func:`id_problem` names what is wrong with one.
"""

from __future__ import annotations


def id_problem(value: str, max_len: int) -> str | None:
    """Why ``value`` is not a valid id: ``MISSING_ID``, ``ID_TOO_LONG``, ``INVALID_ID``, or
    ``None`` when it is valid."""
    if not value:
        return "MISSING_ID"
    if len(value) > max_len:
        return "ID_TOO_LONG"
    if not value.isprintable():
        return "INVALID_ID"
    return None
