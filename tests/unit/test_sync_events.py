"""Relation event decoding and validation, RFC 3339 helpers, the producer's JSON input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.v1 import events_pb2
from pricing_service.errors import InvalidArgumentError
from pricing_service.ids import id_problem
from pricing_service.membership.derive import FactWrite, Ttls
from pricing_service.membership.layout import EPOCH_MS, Facts, Follow, Purchases
from sync_worker.common import CLOCK_SKEW_MS, TimeFormatError, format_rfc3339_ms, parse_rfc3339_ms
from sync_worker.events import (
    EVENT_FIELD,
    FOLLOW,
    PURCHASE,
    UNFOLLOW,
    PoisonEntry,
    decode_entry,
    event_from_json,
    events_from_jsonl,
    make_event,
)

NOW = 1_760_000_000_000
TTLS = Ttls.from_seconds(3600, 7200, 30)


def entry(ev: events_pb2.RelationEvent) -> dict[bytes, bytes]:
    return {EVENT_FIELD: ev.SerializeToString()}


def decode(fields: dict[bytes, bytes]) -> object:
    return decode_entry(fields, now_ms=NOW, max_id_length=16)


def reason_of(fields: dict[bytes, bytes]) -> str:
    with pytest.raises(PoisonEntry) as exc:
        decode(fields)
    return exc.value.reason


def test_follow_event_decodes_to_a_follow_fact() -> None:
    ev = decode_entry(
        entry(make_event("follow", "u1", "42", NOW - 5, event_id="e1")),
        now_ms=NOW,
        max_id_length=16,
    )
    assert (ev.event_id, ev.type, ev.user_id, ev.seller_id, ev.occurred_ms) == (
        "e1",
        FOLLOW,
        "u1",
        "42",
        NOW - 5,
    )
    assert not ev.expired
    [w] = ev.writes(TTLS)
    assert isinstance(w, FactWrite) and (w.user_id, w.seller_id) == ("u1", "42")
    assert w.facts == Facts(Follow(NOW - 5, False, NOW - 5 + 3_600_000, NOW - 5))


def test_unfollow_is_a_tombstone_and_a_purchase_needs_no_follow() -> None:
    ev = decode_entry(entry(make_event(UNFOLLOW, "u1", "42", NOW)), now_ms=NOW, max_id_length=16)
    [w] = ev.writes(TTLS)
    assert isinstance(w, FactWrite)
    assert w.facts == Facts(Follow(NOW, True, NOW + 7_200_000))
    ev = decode_entry(entry(make_event(PURCHASE, "u1", "42", NOW)), now_ms=NOW, max_id_length=16)
    [w] = ev.writes(TTLS)
    assert isinstance(w, FactWrite)
    assert w.facts == Facts(None, Purchases(NOW + 3_600_000, 1, NOW))


def test_poison_reasons() -> None:
    assert reason_of({b"other": b"x"}) == "MISSING_EVENT_FIELD"
    assert reason_of({EVENT_FIELD: b"\xff\xff\xff\xff"}) == "UNDECODABLE"
    ev = make_event(FOLLOW, "u1", "42", NOW)
    ev.type = events_pb2.RELATION_EVENT_TYPE_UNSPECIFIED
    assert reason_of(entry(ev)) == "UNSPECIFIED_TYPE"
    ev.type = 9  # type: ignore[assignment]
    assert reason_of(entry(ev)) == "UNKNOWN_TYPE"
    assert reason_of(entry(make_event(FOLLOW, "", "42", NOW))) == "MISSING_USER_ID"
    assert reason_of(entry(make_event(FOLLOW, "u1", "", NOW))) == "MISSING_SELLER_ID"
    assert reason_of(entry(make_event(FOLLOW, "u" * 17, "42", NOW))) == "ID_TOO_LONG"
    assert reason_of(entry(make_event(FOLLOW, "u\n1", "42", NOW))) == "INVALID_ID"
    no_time = make_event(FOLLOW, "u1", "42", NOW)
    no_time.ClearField("occurred_at")
    assert reason_of(entry(no_time)) == "MISSING_OCCURRED_AT"
    assert reason_of(entry(make_event(FOLLOW, "u1", "42", NOW + CLOCK_SKEW_MS + 1))) == (
        "FUTURE_EVENT"
    )


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(NOW // 1000, -1), (NOW // 1000, 1_000_000_000), (253_402_300_800, 0), (-62_135_596_801, 0)],
)
def test_occurred_at_outside_the_timestamp_spec_is_poison(seconds: int, nanos: int) -> None:
    ev = make_event(FOLLOW, "u1", "42", NOW)
    ev.occurred_at.seconds, ev.occurred_at.nanos = seconds, nanos
    assert reason_of(entry(ev)) == "INVALID_OCCURRED_AT"
    ev.occurred_at.nanos = 999_999_999  # the largest valid nanos: applied, version S.999
    ev.occurred_at.seconds = NOW // 1000 - 1
    assert decode(entry(ev)).occurred_ms == NOW - 1  # type: ignore[attr-defined]


def test_small_clock_skew_is_accepted_and_pre_epoch_events_are_expired() -> None:
    ev = decode(entry(make_event(FOLLOW, "u1", "42", NOW + CLOCK_SKEW_MS)))
    assert not ev.expired  # type: ignore[attr-defined]
    old = decode(entry(make_event(FOLLOW, "u1", "42", EPOCH_MS - 1)))
    assert old.expired  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_decoder(raw: bytes) -> None:
    try:
        decode({EVENT_FIELD: raw})
    except PoisonEntry as exc:
        assert exc.reason.isupper()


def test_rfc3339() -> None:
    assert parse_rfc3339_ms("2025-01-02T03:04:05.123Z") == 1_735_787_045_123
    assert parse_rfc3339_ms("2025-01-02T04:04:05.123+01:00") == 1_735_787_045_123
    assert format_rfc3339_ms(1_735_787_045_123) == "2025-01-02T03:04:05.123Z"
    assert format_rfc3339_ms(1_735_787_045_999) == "2025-01-02T03:04:05.999Z"
    for bad in ("2025-01-02", "2025-01-02T03:04:05", "yesterday", "2025-13-02T03:04:05Z", ""):
        with pytest.raises(TimeFormatError):
            parse_rfc3339_ms(bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_rfc3339_round_trip(ms: int) -> None:
    assert parse_rfc3339_ms(format_rfc3339_ms(ms)) == ms


def test_id_problem() -> None:
    assert id_problem("ok", 4) is None
    assert id_problem("", 4) == "MISSING_ID"
    assert id_problem("12345", 4) == "ID_TOO_LONG"
    assert id_problem("a\x00", 4) == "INVALID_ID"


def test_events_from_json_lines() -> None:
    evs = events_from_jsonl(
        [
            '{"type": "follow", "user_id": "u1", "seller_id": "7", '
            '"occurred_at": "2025-01-02T03:04:05.123Z", "event_id": "x"}',
            "",
            '{"type": "UNFOLLOW", "user_id": "u1", "seller_id": "7", "occurred_at": 1735787046000}',
        ]
    )
    assert [e.type for e in evs] == [FOLLOW, UNFOLLOW]
    assert evs[0].event_id == "x"
    assert evs[0].occurred_at.seconds == 1_735_787_045
    assert evs[0].occurred_at.nanos == 123_000_000
    assert evs[1].event_id  # generated


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "BAD_JSON"),
        ("[1]", "NOT_AN_OBJECT"),
        ('{"type": "follow", "user_id": "u", "seller_id": "s"}', "MISSING_FIELD"),
        (
            '{"type": "like", "user_id": "u", "seller_id": "s", "occurred_at": 1735787046000}',
            "UNKNOWN_TYPE",
        ),
        (
            '{"type": "follow", "user_id": "u", "seller_id": "s", "occurred_at": "monday"}',
            "BAD_TIMESTAMP",
        ),
        ('{"type": "follow", "user_id": 1, "seller_id": "s", "occurred_at": 5}', "NOT_A_STRING"),
    ],
)
def test_bad_json_lines_are_refused_with_line_number(line: str, reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        events_from_jsonl(['{"type": "follow", "user_id": "u", "seller_id": "s", '
                           '"occurred_at": 1735787046000}', line])  # fmt: skip
    assert exc.value.reason == reason
    assert "line 2" in exc.value.message


def test_event_from_json_refuses_booleans_as_times() -> None:
    with pytest.raises(InvalidArgumentError):
        event_from_json({"type": "follow", "user_id": "u", "seller_id": "s", "occurred_at": True})
