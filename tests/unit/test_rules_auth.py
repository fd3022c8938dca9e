"""Bearer-token checks of the admin service (no I/O)."""

from __future__ import annotations

import hashlib

import pytest

from pricing_service.auth import check_bearer, fingerprint
from pricing_service.config import load_settings
from pricing_service.errors import UnauthenticatedError

TOKENS = frozenset({"old-secret", "new-secret"})


def reason_of(metadata: object, tokens: frozenset[str] = TOKENS) -> str:
    with pytest.raises(UnauthenticatedError) as info:
        check_bearer(metadata, tokens)  # type: ignore[arg-type]
    return info.value.reason


def test_each_configured_token_is_accepted_and_identified_by_fingerprint() -> None:
    for token in TOKENS:
        actor = check_bearer((("authorization", f"Bearer {token}"),), TOKENS)
        assert actor == "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]
        assert token not in actor
    assert fingerprint("old-secret") != fingerprint("new-secret")


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (None, "MISSING_CREDENTIALS"),
        ((), "MISSING_CREDENTIALS"),
        ((("x-actor", "alice"),), "MISSING_CREDENTIALS"),
        ((("authorization", "   "),), "MISSING_CREDENTIALS"),
        ((("authorization", "new-secret"),), "MISSING_CREDENTIALS"),
        ((("authorization", "Token new-secret"),), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer "),), "MISSING_CREDENTIALS"),
        ((("authorization", b"Bearer new-secret"),), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer new-secre"),), "INVALID_TOKEN"),
        ((("authorization", "Bearer new-secrett"),), "INVALID_TOKEN"),
        ((("authorization", "Bearer NEW-SECRET"),), "INVALID_TOKEN"),
        ((("authorization", "Bearer old-secret,new-secret"),), "INVALID_TOKEN"),
    ],
)
def test_refusals(metadata: object, reason: str) -> None:
    assert reason_of(metadata) == reason


def test_no_configured_token_refuses_everything() -> None:
    assert reason_of((("authorization", "Bearer anything"),), frozenset()) == "AUTH_DISABLED"
    assert reason_of((("authorization", "Bearer "),), frozenset()) == "MISSING_CREDENTIALS"


def test_declared_actor_is_recorded_with_the_token_fingerprint() -> None:
    md = (("x-actor", "alice@shop-42"), ("authorization", "bearer new-secret"))
    assert check_bearer(md, TOKENS) == f"alice@shop-42 ({fingerprint('new-secret')})"
    sneaky = (
        ("x-actor", "eve\n(token:deadbeef)" + "x" * 300),
        ("authorization", "Bearer old-secret"),
    )
    actor = check_bearer(sneaky, TOKENS)
    assert "\n" not in actor
    assert actor.endswith(f"({fingerprint('old-secret')})")
    assert len(actor) <= 128 + 20
    assert check_bearer((("x-actor", "   "), ("authorization", "Bearer old-secret")), TOKENS) == (
        fingerprint("old-secret")
    )


def test_settings_split_rotated_tokens() -> None:
    s = load_settings(admin_token=" old-secret , new-secret,, ")
    assert s.admin_tokens() == TOKENS
    assert load_settings().max_rules_per_item == 8
