"""Page tokens of the rule store's listings: opaque, tied to the query that issued them.

A token encodes the keyset position of the last row of a page and a tag of the query's
filters, so a forged token, or one carried over to a query with other filters, is refused
(INVALID_ARGUMENT ``INVALID_PAGE_TOKEN``) rather than answered from the wrong place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from pricing_service.errors import InvalidArgumentError


def _filter_tag(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def encode_token(position: list[Any], *filters: str) -> str:
    raw = json.dumps({"p": position, "f": _filter_tag(*filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, *filters: str, field: str = "page_token") -> list[Any]:
    """The position a token encodes; INVALID_ARGUMENT if forged or from another query."""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position = data["p"]
        tag = data["f"]
        if not isinstance(position, list) or not isinstance(tag, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError):
        raise InvalidArgumentError.field(
            field, "is not a token this service issued", "INVALID_PAGE_TOKEN"
        ) from None
    if tag != _filter_tag(*filters):
        raise InvalidArgumentError.field(
            field,
            "was issued for a different query (filters changed between pages)",
            "INVALID_PAGE_TOKEN",
        )
    return position


def malformed_token() -> InvalidArgumentError:
    """A token this service issued, but not for a listing of this shape."""
    return InvalidArgumentError.field("page_token", "is malformed", "INVALID_PAGE_TOKEN")
