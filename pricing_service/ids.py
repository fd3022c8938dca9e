"""The id rule shared by the server and the sync worker (no I/O).

An id (buyer, seller, item, crowd, event source) is non-empty, at most ``max_len`` characters
and printable (no control characters). :func:`id_problem` names what is wrong with one;
:func:`require_id` refuses it as a request's field (``INVALID_ARGUMENT`` naming the field).
"""

from __future__ import annotations

from pricing_service.errors import InvalidArgumentError


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


def require_id(value: str, field: str, max_len: int) -> str:
    """A non-empty, bounded id without control characters (:func:`id_problem`)."""
    problem = id_problem(value, max_len)
    if problem is None:
        return value
    if problem == "MISSING_ID":
        raise InvalidArgumentError.field(field, "must not be empty", problem)
    if problem == "ID_TOO_LONG":
        raise InvalidArgumentError.field(field, f"longer than {max_len} characters", problem)
    raise InvalidArgumentError.field(field, "must not contain control characters", problem)
