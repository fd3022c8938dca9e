"""Bearer-token authentication from gRPC metadata.

``authorization: Bearer <token>`` must equal one of the configured tokens (several may be
configured at once, so a token is rotated by adding the new one, moving clients, then removing
the old one: no downtime). Every configured token is compared, in constant time
(:func:`hmac.compare_digest`), so the time taken does not reveal which one nearly matched.

The caller's identity for the audit trail (:func:`check_bearer`'s result) is the token's
fingerprint (``token:<8 hex of sha256>``, never the token itself), prefixed by a self-declared
``x-actor`` when the request carries one: ``alice (token:1a2b3c4d)``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from pricing_service.errors import UnauthenticatedError

MAX_ACTOR_LENGTH = 128


def fingerprint(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


def _get(metadata: Iterable[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v if isinstance(v, str) else None
    return None


def check_bearer(metadata: Iterable[Any] | None, tokens: frozenset[str]) -> str:
    """The caller's actor identity, or :class:`UnauthenticatedError`.

    ``metadata`` is gRPC invocation metadata: (key, value) pairs with lower-case keys.
    With no configured tokens every call is refused (reason ``AUTH_DISABLED``).
    """
    header = _get(metadata, "authorization")
    if header is None or not header.strip():
        raise UnauthenticatedError(
            "missing credentials: send metadata 'authorization: Bearer <token>'",
            reason="MISSING_CREDENTIALS",
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthenticatedError(
            "the authorization metadata must be 'Bearer <token>'", reason="MISSING_CREDENTIALS"
        )
    if not tokens:
        raise UnauthenticatedError(
            "no token is configured for this service", reason="AUTH_DISABLED"
        )
    presented = token.encode()
    matched = False
    for candidate in tokens:
        matched |= hmac.compare_digest(presented, candidate.encode())
    if not matched:
        raise UnauthenticatedError("invalid token", reason="INVALID_TOKEN")
    identity = fingerprint(token)
    declared = _get(metadata, "x-actor")
    if declared:
        declared = "".join(ch for ch in declared if ch.isprintable())[:MAX_ACTOR_LENGTH].strip()
        if declared:
            return f"{declared} ({identity})"
    return identity
