"""What the load knows: the constants of its world, the :class:`MembershipModel` (what Redis
must end up holding) and the records of what happened (calls, violations, acknowledged rules),
the buyers' roles and the load's settings."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from redis.exceptions import RedisError

from pricing.v1 import common_pb2
from pricing_service.membership import derive
from pricing_service.membership.derive import FactWrite, MembershipWrite, Ttls
from pricing_service.membership.layout import Facts, Follow, Purchases
from pricing_service.redis_errors import TRANSIENT_ERRORS
from pricing_testing.status import error_details

SELLER = "42"
ITEM = "1001"
LIST_PRICE = 2500
FAN_PRICE = 1888
CURRENCY = "CNY"
#: Sellers the streaming buyers follow and unfollow (no rules: they only make events).
STREAM_SELLERS = tuple(str(s) for s in range(100, 110))
DEFAULT_TTLS = Ttls.from_seconds(48 * 3600, 48 * 3600, 30)
ADMIN_TOKEN = "test-admin-token"
#: What a publish may meet while Redis (or a cluster node) is down or failing over: retried.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, *TRANSIENT_ERRORS)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def money(amount: int, currency: str = CURRENCY) -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, amount_minor=amount)


def code_name(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return str(err.code().name)
    return type(err).__name__


def reason_of(err: BaseException) -> str:
    """The ``ErrorInfo`` reason a server gave with an error ("" when it carries none: the
    transport's own failures, a deadline the client enforced)."""
    if not isinstance(err, grpc.aio.AioRpcError):
        return ""
    try:
        details = error_details(err)
    except ValueError:  # a status that disagrees with the call's code
        return ""
    return details[0] if details is not None else ""


# --- the model ------------------------------------------------------------------------------
_Key = tuple[str, str]  # (buyer, seller)


def _up(ms: int) -> int:
    return -(-ms // 1000) * 1000


class MembershipModel:
    """What Redis must hold per (buyer, seller): the latest follow fact by its time (an unfollow
    wins a tie) and the purchases known (maxima), times kept to the second. Nothing lapses
    during a run (48 h lifetimes)."""

    def __init__(self, ttls: Ttls = DEFAULT_TTLS) -> None:
        self.ttls = ttls
        self.follows: dict[_Key, Follow] = {}
        self.purchases: dict[_Key, Purchases] = {}
        self.by_user: dict[str, set[str]] = {}
        self.users: set[str] = set()

    def apply(self, writes: Iterable[MembershipWrite]) -> None:
        for w in writes:
            if not isinstance(w, FactWrite):
                continue
            self.users.add(w.user_id)
            key = (w.user_id, w.seller_id)
            self.by_user.setdefault(w.user_id, set()).add(w.seller_id)
            f, p = w.facts.follow, w.facts.purchases
            if f is not None:
                f = Follow(f.version_ms, f.tombstone, _up(f.expires_ms),
                           0 if f.tombstone else _up(f.since_ms))  # fmt: skip
                cur = self.follows.get(key)
                if cur is None or (f.version_ms, f.tombstone, f.expires_ms, f.since_ms) > (
                    cur.version_ms, cur.tombstone, cur.expires_ms, cur.since_ms
                ):  # fmt: skip
                    self.follows[key] = f
            if p is not None:
                p = Purchases(_up(p.expires_ms), min(p.count, 65_535), p.last_ms // 1000 * 1000)
                old = self.purchases.get(key)
                if old is not None:
                    p = Purchases(max(p.expires_ms, old.expires_ms), max(p.count, old.count),
                                  max(p.last_ms, old.last_ms))  # fmt: skip
                self.purchases[key] = p

    def snapshot_row(self, user: str, seller: str, followed_ms: int, bought: int, cut: int) -> None:
        self.apply(derive.snapshot_row(user, seller, followed_ms, bought, cut, self.ttls))

    def event(self, kind: str, user: str, seller: str, at_ms: int) -> None:
        fn = {"follow": derive.follow, "unfollow": derive.unfollow, "purchase": derive.purchase}
        self.apply(fn[kind](user, seller, at_ms, self.ttls))

    def expected(self, user: str) -> dict[str, Facts]:
        return {
            s: Facts(self.follows.get((user, s)), self.purchases.get((user, s)))
            for s in self.by_user.get(user, ())
        }

    def is_fan(self, user: str, seller: str) -> bool:
        f = self.follows.get((user, seller))
        return f is not None and not f.tombstone and f.expires_ms > now_ms()


# --- what happened --------------------------------------------------------------------------
@dataclass(slots=True)
class Call:
    """One RPC: wall-clock start and end (ms), outcome code, and what it answered."""

    method: str
    user: str
    start_ms: float
    end_ms: float
    code: str
    degraded: bool = False
    verdict: int = 0
    #: its x-request-id: the server logs it on the call's rpc_finished line
    request_id: str = ""
    #: the ErrorInfo reason of a failure ("" for none)
    reason: str = ""

    @property
    def latency_ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass(frozen=True, slots=True)
class Violation:
    what: str
    detail: str
    at_ms: float


@dataclass(slots=True)
class AckedRule:
    rule_id: str
    item_id: str
    amount: int
    revision: int


@dataclass
class Population:
    """The buyers of one run, by role."""

    fans: list[str]  # follow SELLER from the snapshot and stay fans (get purchase events)
    churn: list[str]  # follow SELLER from the snapshot, unfollowed once during the load
    streamers: list[str]  # follow / unfollow STREAM_SELLERS again and again by events
    strangers: list[str]  # never follow anybody

    @classmethod
    def make(
        cls, tag: str, *, fans: int = 20, churn: int = 20, streamers: int = 40, strangers: int = 10
    ) -> Population:
        return cls(
            [f"{tag}fan{i}" for i in range(fans)],
            [f"{tag}churn{i}" for i in range(churn)],
            [f"{tag}str{i}" for i in range(streamers)],
            [f"{tag}nobody{i}" for i in range(strangers)],
        )

    @property
    def everyone(self) -> list[str]:
        return self.fans + self.churn + self.streamers + self.strangers


@dataclass
class LoadConfig:
    batch_deadline_s: float = 1.0
    strict_deadline_s: float = 1.0
    admin_deadline_s: float = 2.0
    batch_concurrency: int = 2
    strict_concurrency: int = 1
    batch_items: int = 20
    event_interval_s: float = 0.05
    events_per_tick: int = 8
    admin_interval_s: float = 0.15
    #: Seconds over which the churn buyers are unfollowed, one after the other.
    unfollow_spread_s: float = 3.0
    strict_max_lag_ms: int = 1000
    #: Pause between calls of one caller loop (0 = closed loop).
    call_pause_s: float = 0.0
