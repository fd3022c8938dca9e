"""A plain-Python model of membership facts for the sync worker's tests.

Besides the model's own tests this module holds helpers the other ``test_sync_*`` modules
import: reading a namespace's whole fact state back from Redis, and running the ``sync-worker``
CLI as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import redis

from pricing_service.membership.derive import (
    FactWrite,
    MembershipWrite,
    Ttls,
    follow,
    purchase,
    unfollow,
)
from pricing_service.membership.layout import (
    Facts,
    Follow,
    LayoutError,
    MembershipLayout,
    Purchases,
)

ROOT = Path(__file__).resolve().parents[2]
Key = tuple[str, str]  # (user, seller)


def _up(ms: int) -> int:
    return -(-ms // 1000) * 1000


class Model:
    """(user, seller) -> facts, with the layout's documented rules: the follow part is the
    latest fact by its time (an unfollow wins a tie), purchases merge by maxima, times are kept
    to the second; what has lapsed at the time of a write is forgotten."""

    def __init__(self) -> None:
        self.recs: dict[Key, Facts] = {}

    def apply(self, writes: Iterable[MembershipWrite], now_ms: int) -> None:
        for w in writes:
            if not isinstance(w, FactWrite):
                continue
            key = (w.user_id, w.seller_id)
            old = self.recs.get(key)
            old_f = old.follow if old is not None else None
            old_p = old.purchases if old is not None else None
            if old_f is not None and old_f.expires_ms <= now_ms:
                old_f = None
            if old_p is not None and old_p.expires_ms <= now_ms:
                old_p = None
            f, p = w.facts.follow, w.facts.purchases
            if f is not None:
                f = Follow(
                    f.version_ms,
                    f.tombstone,
                    _up(f.expires_ms),
                    0 if f.tombstone else _up(f.since_ms),
                )
                if f.expires_ms <= now_ms:
                    f = None
            if p is not None:
                p = Purchases(_up(p.expires_ms), min(p.count, 65_535), p.last_ms // 1000 * 1000)
                if p.expires_ms <= now_ms:
                    p = None
            if f is None or (
                old_f is not None
                and (f.version_ms, f.tombstone, f.expires_ms, f.since_ms)
                <= (old_f.version_ms, old_f.tombstone, old_f.expires_ms, old_f.since_ms)
            ):
                f = old_f
            if p is None:
                p = old_p
            elif old_p is not None:
                p = Purchases(
                    max(p.expires_ms, old_p.expires_ms),
                    max(p.count, old_p.count),
                    max(p.last_ms, old_p.last_ms),
                )
            if f is None and p is None:
                self.recs.pop(key, None)
            else:
                self.recs[key] = Facts(f, p)

    def live(self, now_ms: int) -> dict[Key, Facts]:
        out = {}
        for k, facts in self.recs.items():
            live = facts.live(now_ms)
            if live is not None:
                out[k] = live
        return out


def redis_state(url: str, namespace: str, now_ms: int) -> dict[Key, Facts]:
    """Every live fact of a namespace, read back from Redis."""
    layout = MembershipLayout(namespace)
    client = redis.Redis.from_url(url, socket_timeout=10)
    out: dict[Key, Facts] = {}
    try:
        for key in client.scan_iter(match=layout.user_key_pattern(), count=1000):
            user = layout.user_from_key(key.decode())
            if client.type(key) != b"hash":
                continue
            for f, v in client.hgetall(key).items():
                try:
                    kind, seller = layout.parse_field(f)
                    if kind != "facts":
                        continue
                    raw = v if isinstance(v, bytes) else v.encode()
                    facts = layout.decode_facts(raw).live(now_ms)
                except LayoutError:
                    continue
                if facts is not None:
                    out[(user, str(seller))] = facts
    finally:
        client.close()
    return out


def cli_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
    env.update(
        {
            "PRICING_REDIS_URL": redis_url,
            "PRICING_REDIS_NAMESPACE": namespace,
            "PRICING_LOG_FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync_worker", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def popen(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sync_worker", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- the model's own tests -----------------------------------------------------------------------
TTLS = Ttls.from_seconds(3600, 7200, 30)
T = 1_760_000_000_000


def test_model_last_writer_wins_in_any_order() -> None:
    a = Model()
    a.apply(follow("u", "7", T, TTLS) + unfollow("u", "7", T + 1, TTLS), T)
    b = Model()
    b.apply(unfollow("u", "7", T + 1, TTLS) + follow("u", "7", T, TTLS), T)
    assert a.live(T) == b.live(T)
    f = a.live(T)[("u", "7")].follow
    assert f is not None and f.tombstone


def test_model_tie_goes_to_the_tombstone_and_a_purchase_needs_no_fan() -> None:
    m = Model()
    m.apply(purchase("u", "7", T, TTLS), T)
    assert m.live(T)[("u", "7")].purchases is not None
    m.apply(follow("u", "7", T + 1, TTLS) + unfollow("u", "7", T + 1, TTLS), T)
    f = m.live(T)[("u", "7")].follow
    assert f is not None and f.tombstone


def test_model_drops_expired_facts() -> None:
    m = Model()
    m.apply(follow("u", "7", T, TTLS), T)
    assert m.live(T + 3_600_000) == {}
