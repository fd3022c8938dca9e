"""A plain-Python model of membership (last writer wins) for the sync worker's tests.

Besides the model's own tests this module holds helpers the other ``test_sync_*`` modules
import: reading a namespace's whole membership state back from Redis, and running the
``sync-worker`` CLI as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import redis

from pricing_service.domain import Crowd, CrowdKind
from pricing_service.membership.derive import MembershipWrite, Ttls, follow, purchase, unfollow
from pricing_service.membership.layout import LayoutError, MembershipLayout, Record

ROOT = Path(__file__).resolve().parents[2]
Key = tuple[str, Crowd]


class Model:
    """(user, crowd) -> Record, with the store's rules: newer version wins, on a tie the
    tombstone wins; a conditional write needs a live, non-tombstone condition record."""

    def __init__(self) -> None:
        self.recs: dict[Key, Record] = {}

    def apply(self, writes: Iterable[MembershipWrite], now_ms: int) -> None:
        for w in writes:
            if w.requires is not None:
                cond = self.recs.get((w.user_id, w.requires))
                if cond is None or not cond.is_member(now_ms):
                    continue
            key = (w.user_id, w.crowd)
            old = self.recs.get(key)
            if old is not None and not old.is_live(now_ms):
                old = None
            if old is not None and (
                w.version_ms < old.version_ms
                or (w.version_ms == old.version_ms and w.tombstone <= old.tombstone)
            ):
                continue
            self.recs[key] = Record(w.tombstone, w.version_ms, w.expires_ms)

    def live(self, now_ms: int) -> dict[Key, Record]:
        return {k: r for k, r in self.recs.items() if r.is_live(now_ms)}


def redis_state(url: str, namespace: str, now_ms: int) -> dict[Key, Record]:
    """Every live record of a namespace, read back from Redis."""
    layout = MembershipLayout(namespace)
    client = redis.Redis.from_url(url, socket_timeout=10)
    out: dict[Key, Record] = {}
    try:
        for key in client.scan_iter(match=layout.user_key_pattern(), count=1000):
            user = layout.user_from_key(key.decode())
            if client.type(key) != b"hash":
                continue
            for f, v in client.hgetall(key).items():
                try:
                    rec = layout.decode(v)
                except LayoutError:
                    continue
                if rec.is_live(now_ms):
                    out[(user, layout.field_crowd(f))] = rec
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
ALL = Crowd("7", CrowdKind.ALL_FANS)
BOUGHT = Crowd("7", CrowdKind.PURCHASED_FANS)


def test_model_last_writer_wins_in_any_order() -> None:
    a = Model()
    a.apply(follow("u", "7", T, TTLS) + unfollow("u", "7", T + 1, TTLS), T)
    b = Model()
    b.apply(unfollow("u", "7", T + 1, TTLS) + follow("u", "7", T, TTLS), T)
    assert a.live(T) == b.live(T)
    assert a.live(T)[("u", ALL)].tombstone


def test_model_tie_goes_to_the_tombstone_and_purchase_needs_a_fan() -> None:
    m = Model()
    m.apply(purchase("u", "7", T, TTLS), T)
    assert ("u", BOUGHT) not in m.live(T)
    m.apply(follow("u", "7", T, TTLS) + purchase("u", "7", T + 1, TTLS), T)
    assert ("u", BOUGHT) in m.live(T)
    m.apply(unfollow("u", "7", T + 1, TTLS) + follow("u", "7", T + 1, TTLS), T)
    assert m.live(T)[("u", ALL)].tombstone


def test_model_drops_expired_records() -> None:
    m = Model()
    m.apply(follow("u", "7", T, TTLS), T)
    assert m.live(T + 3_600_000) == {}
