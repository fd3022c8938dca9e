"""Relation events: the stream entry format, validation, derivation into writes, and a producer.

A stream entry has one field, ``event`` = a serialized ``pricing.v1.RelationEvent``. An entry
is *poison* when no number of redeliveries can make it apply; :func:`decode_entry` names why with
an UPPER_SNAKE reason:

* ``MISSING_EVENT_FIELD`` - the entry has no ``event`` field;
* ``UNDECODABLE`` - the bytes are not a ``RelationEvent``;
* ``UNSPECIFIED_TYPE`` / ``UNKNOWN_TYPE`` - type 0, or a number this version does not know;
* ``MISSING_USER_ID`` / ``MISSING_SELLER_ID`` / ``ID_TOO_LONG`` / ``INVALID_ID`` - bad ids
  (the server's id rule: non-empty, at most ``max_id_length``, printable);
* ``MISSING_OCCURRED_AT`` - no ``occurred_at``;
* ``INVALID_OCCURRED_AT`` - an ``occurred_at`` outside the Timestamp spec (``nanos`` outside
  0..999,999,999, ``seconds`` outside years 1..9999): no instant to version a record with;
* ``FUTURE_EVENT`` - ``occurred_at`` later than now + :data:`~sync_worker.common.CLOCK_SKEW_MS`; such an event would
  win every later last-writer-wins comparison until its date.

An event dated before the layout epoch (2024-01-01) is valid but long expired under any TTL: it
is acknowledged and counted as stale (:attr:`DecodedEvent.expired`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from pricing.v1 import events_pb2
from pricing_service.errors import InvalidArgumentError
from pricing_service.ids import id_problem
from pricing_service.membership import derive
from pricing_service.membership.derive import MembershipWrite, Ttls
from pricing_service.membership.layout import EPOCH_MS
from pricing_service.servicers.convert import timestamp_to_ms
from sync_worker.common import CLOCK_SKEW_MS, TimeFormatError, parse_rfc3339_ms

EVENT_FIELD: Final = b"event"

FOLLOW: Final = events_pb2.RELATION_EVENT_TYPE_FOLLOW
UNFOLLOW: Final = events_pb2.RELATION_EVENT_TYPE_UNFOLLOW
PURCHASE: Final = events_pb2.RELATION_EVENT_TYPE_PURCHASE

TYPE_NAMES: Final = {"follow": FOLLOW, "unfollow": UNFOLLOW, "purchase": PURCHASE}
_DERIVE: Final[dict[int, Callable[[str, str, int, Ttls], list[MembershipWrite]]]] = {
    FOLLOW: derive.follow,
    UNFOLLOW: derive.unfollow,
    PURCHASE: derive.purchase,
}


class PoisonEntry(Exception):
    """A stream entry that can never apply; ``reason`` is UPPER_SNAKE."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DecodedEvent:
    """A valid relation event."""

    event_id: str
    type: int
    user_id: str
    seller_id: str
    occurred_ms: int

    @property
    def expired(self) -> bool:
        """Older than the layout epoch: acknowledged and counted as stale, never written."""
        return self.occurred_ms <= EPOCH_MS

    def writes(self, ttls: Ttls) -> list[MembershipWrite]:
        return _DERIVE[self.type](self.user_id, self.seller_id, self.occurred_ms, ttls)


def validate_event(
    ev: events_pb2.RelationEvent, *, now_ms: int, max_id_length: int
) -> DecodedEvent:
    """Check a decoded message; raise :class:`PoisonEntry` with the reason when it is bad."""
    if ev.type == events_pb2.RELATION_EVENT_TYPE_UNSPECIFIED:
        raise PoisonEntry("UNSPECIFIED_TYPE", "type is RELATION_EVENT_TYPE_UNSPECIFIED")
    if ev.type not in _DERIVE:
        raise PoisonEntry("UNKNOWN_TYPE", f"unknown event type {ev.type}")
    for name, value in (("user_id", ev.user_id), ("seller_id", ev.seller_id)):
        problem = id_problem(value, max_id_length)
        if problem == "MISSING_ID":
            raise PoisonEntry(f"MISSING_{name.upper()}", f"{name} is empty")
        if problem is not None:
            raise PoisonEntry(problem, f"{name} {value[:40]!r}... is not a valid id")
    if not ev.HasField("occurred_at"):
        raise PoisonEntry("MISSING_OCCURRED_AT", "occurred_at is not set")
    try:
        occurred = timestamp_to_ms(ev.occurred_at, "occurred_at")
    except InvalidArgumentError as exc:
        raise PoisonEntry("INVALID_OCCURRED_AT", exc.message) from None
    if occurred > now_ms + CLOCK_SKEW_MS:
        raise PoisonEntry(
            "FUTURE_EVENT", f"occurred_at is {occurred - now_ms} ms in the future (clock skew?)"
        )
    return DecodedEvent(ev.event_id, int(ev.type), ev.user_id, ev.seller_id, occurred)


def validate_events(
    events: Sequence[events_pb2.RelationEvent], *, now_ms: int | None, max_id_length: int
) -> None:
    """What a producer checks before publishing anything: every event as the consumer will
    (``now_ms`` default: now); the first bad one raises INVALID_ARGUMENT (``events[i]``)."""
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    for i, ev in enumerate(events):
        try:
            validate_event(ev, now_ms=now, max_id_length=max_id_length)
        except PoisonEntry as exc:
            raise InvalidArgumentError.field(f"events[{i}]", exc.detail, exc.reason) from None


def decode_entry(fields: Mapping[bytes, bytes], *, now_ms: int, max_id_length: int) -> DecodedEvent:
    """Decode one stream entry's fields; raise :class:`PoisonEntry` when it is bad."""
    raw = fields.get(EVENT_FIELD)
    if raw is None:
        raise PoisonEntry("MISSING_EVENT_FIELD", f"no {EVENT_FIELD.decode()!r} field")
    ev = events_pb2.RelationEvent()
    try:
        ev.ParseFromString(raw)
    except DecodeError as exc:
        raise PoisonEntry("UNDECODABLE", f"not a RelationEvent: {exc}") from None
    return validate_event(ev, now_ms=now_ms, max_id_length=max_id_length)


# --- producing ---------------------------------------------------------------------------------
def make_event(
    type_: int | str,
    user_id: str,
    seller_id: str,
    occurred_ms: int,
    *,
    event_id: str | None = None,
) -> events_pb2.RelationEvent:
    """A ``RelationEvent``; ``type_`` is the enum number or ``follow``/``unfollow``/``purchase``."""
    t: int
    if isinstance(type_, str):
        found = TYPE_NAMES.get(type_.lower())
        if found is None:
            raise InvalidArgumentError.field(
                "type", f"{type_!r} is not one of {sorted(TYPE_NAMES)}", "UNKNOWN_TYPE"
            )
        t = int(found)
    else:
        t = type_
    ev = events_pb2.RelationEvent(
        event_id=event_id or uuid.uuid4().hex,
        user_id=user_id,
        seller_id=seller_id,
        type=events_pb2.RelationEventType.ValueType(t),
    )
    ev.occurred_at.seconds, millis = divmod(occurred_ms, 1000)
    ev.occurred_at.nanos = millis * 1_000_000
    return ev


def event_from_json(obj: Any, *, line: int = 0) -> events_pb2.RelationEvent:
    """An event from a JSON object ``{"type", "user_id", "seller_id", "occurred_at"[, "event_id"]}``.

    ``occurred_at`` is RFC 3339 or integer UTC milliseconds.
    """
    where = f"line {line}: " if line else ""
    if not isinstance(obj, dict):
        raise InvalidArgumentError.field(f"{where}event", "must be a JSON object", "NOT_AN_OBJECT")
    for key in ("type", "user_id", "seller_id", "occurred_at"):
        if key not in obj:
            raise InvalidArgumentError.field(f"{where}{key}", "is required", "MISSING_FIELD")
    at = obj["occurred_at"]
    if isinstance(at, int) and not isinstance(at, bool):
        occurred = at
    elif isinstance(at, str):
        try:
            occurred = parse_rfc3339_ms(at)
        except TimeFormatError as exc:
            raise InvalidArgumentError.field(
                f"{where}occurred_at", str(exc), "BAD_TIMESTAMP"
            ) from None
    else:
        raise InvalidArgumentError.field(
            f"{where}occurred_at", "must be RFC 3339 or integer ms", "BAD_TIMESTAMP"
        )
    for key in ("type", "user_id", "seller_id"):
        if not isinstance(obj[key], str):
            raise InvalidArgumentError.field(f"{where}{key}", "must be a string", "NOT_A_STRING")
    event_id = obj.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise InvalidArgumentError.field(f"{where}event_id", "must be a string", "NOT_A_STRING")
    if obj["type"].lower() not in TYPE_NAMES:
        raise InvalidArgumentError.field(
            f"{where}type", f"{obj['type']!r} is not one of {sorted(TYPE_NAMES)}", "UNKNOWN_TYPE"
        )
    return make_event(obj["type"], obj["user_id"], obj["seller_id"], occurred, event_id=event_id)


def events_from_jsonl(lines: Iterable[str]) -> list[events_pb2.RelationEvent]:
    """Parse JSON lines (blank lines ignored); the first bad line raises with its number."""
    out = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError.field(f"line {n}", f"not JSON: {exc}", "BAD_JSON") from None
        out.append(event_from_json(obj, line=n))
    return out


class EventPublisher:
    """Publishes relation events to the stream (for upstream services, demos and tests).

    Validates each event as the consumer will (so a producer learns of a bad event at once)
    unless ``validate=False`` (tests use that to publish poison on purpose).
    """

    def __init__(
        self, redis: aioredis.Redis, stream: str, *, max_id_length: int = 128, chunk: int = 1000
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.max_id_length = max_id_length
        self.chunk = chunk

    async def publish(
        self,
        events: Sequence[events_pb2.RelationEvent],
        *,
        validate: bool = True,
        now_ms: int | None = None,
    ) -> list[str]:
        """XADD every event (pipelined, in order); returns the stream ids."""
        if validate:
            validate_events(events, now_ms=now_ms, max_id_length=self.max_id_length)
        return await self.publish_raw([{EVENT_FIELD: ev.SerializeToString()} for ev in events])

    async def publish_raw(self, entries: Sequence[Mapping[bytes, bytes]]) -> list[str]:
        """XADD raw field maps as they are (no validation)."""
        ids: list[str] = []
        for start in range(0, len(entries), self.chunk):
            pipe = self.redis.pipeline(transaction=False)
            for fields in entries[start : start + self.chunk]:
                pipe.xadd(self.stream, dict(fields))  # type: ignore[arg-type]
            for reply in await pipe.execute():
                ids.append(reply.decode() if isinstance(reply, bytes) else str(reply))
        return ids
