"""Audiences through the real processes: pricing-service, sync-worker, Redis, SQLite.

The defect of issue 14 exactly as a new user met it: a PURCHASED_FANS rule at 9.00 on item X of
seller S (list price 15.00); ``sync-worker publish --type purchase`` with the fact time T-60 s,
then ``--type follow`` with T-120 s. Once the worker has caught up the buyer pays 9.00 and
CheckDiscountStrict says ELIGIBLE - as when the two events arrive in fact order; also when the
follow is only known from a snapshot cut before the purchase and loaded after it, and after an
earlier unfollow. Then a seller-defined crowd end to end, through the CLIs a seller's engineer
uses: a predicate crowd and a list crowd (members through the CLI and a list file), rules on
them, explain's reasons.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_testing.procs import Proc, run_sync_worker
from tests.integration.test_end_to_end import ADMIN, money, rfc3339, write_snapshot

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def upsert(
    channel: grpc.Channel, item: str, amount: int, *, crowd: int = 0, crowd_id: str = ""
) -> None:
    admin_pb2_grpc.DiscountAdminServiceStub(channel).UpsertDiscountRule(
        admin_pb2.UpsertDiscountRuleRequest(
            rule=admin_pb2.DiscountRule(
                seller_id="S",
                item_id=item,
                crowd=crowd,  # type: ignore[arg-type]
                crowd_id=crowd_id,
                price=money(amount),
            )
        ),
        metadata=ADMIN,
        timeout=5,
    )


def publish(env: dict[str, str], kind: str, user: str, at: datetime) -> None:
    r = run_sync_worker(
        env, "publish", "--type", kind, "--user", user, "--seller", "S", "--at", rfc3339(at)
    )
    assert r.returncode == 0, r.stdout + r.stderr


def caught_up(env: dict[str, str], timeout: float = 10) -> None:
    """Until the worker applied everything published (sync-worker status)."""
    deadline = time.monotonic() + timeout
    while True:
        r = run_sync_worker(env, "status")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        if status["caught_up"] and status["lag_ms"] is not None and status["lag_ms"] < 1000:
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def page(stub: pricing_pb2_grpc.PricingServiceStub, user: str, item: str = "X", *,
         explain: bool = False, list_price: int = 1500) -> pricing_pb2.ItemPrice:  # fmt: skip
    r = stub.BatchGetLowestPrice(
        pricing_pb2.BatchGetLowestPriceRequest(
            user_id=user,
            items=[pricing_pb2.PriceQuery(item_id=item, list_price=money(list_price))],
            explain=explain,
        ),
        timeout=5,
    )
    assert not r.degraded
    return r.prices[0]


def strict(stub: pricing_pb2_grpc.PricingServiceStub, user: str, item: str = "X") -> Any:
    deadline = time.monotonic() + 10
    while True:
        try:
            return stub.CheckDiscountStrict(
                pricing_pb2.CheckDiscountStrictRequest(
                    user_id=user, item_id=item, expected_price=money(900)
                ),
                timeout=5,
            )
        except grpc.RpcError as err:  # the watermark is not fresh yet
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert time.monotonic() < deadline
            time.sleep(0.1)


def until_price(stub: pricing_pb2_grpc.PricingServiceStub, user: str, amount: int,
                item: str = "X", timeout: float = 5) -> pricing_pb2.ItemPrice:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        p = page(stub, user, item)
        if p.price.amount_minor == amount or time.monotonic() > deadline:
            return p
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["events out of order", "snapshot then event", "after unfollow"])
def test_a_purchase_published_before_the_follow_is_known_counts(
    system: tuple[dict[str, str], Proc, Proc], tmp_path: Path, how: str
) -> None:
    env, _server, worker = system
    target = env["PRICING_LISTEN"]
    T = datetime.now(UTC)
    with grpc.insecure_channel(target) as channel:
        upsert(channel, "X", 900, crowd=common_pb2.CROWD_KIND_PURCHASED_FANS)
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        until_price(stub, "nobody", 1500)  # the index has the rule (a stranger pays 15.00)
        if how == "after unfollow":
            publish(env, "follow", "U", T - timedelta(minutes=10))
            publish(env, "unfollow", "U", T - timedelta(minutes=5))
            caught_up(env)
        publish(env, "purchase", "U", T - timedelta(seconds=60))
        caught_up(env)
        if how == "snapshot then event":
            # the follow only known from a snapshot cut before the purchase, loaded after it
            write_snapshot(tmp_path / "snap", T - timedelta(seconds=90),
                           [("U", "S", T - timedelta(days=3), 0)])  # fmt: skip
            loaded = run_sync_worker(env, "load-snapshot", str(tmp_path / "snap"))
            assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        else:
            publish(env, "follow", "U", T - timedelta(seconds=120))
        caught_up(env)
        p = until_price(stub, "U", 900)
        assert (p.price.amount_minor, p.discounted, p.crowd) == (
            900, True, common_pb2.CROWD_KIND_PURCHASED_FANS
        ), worker.log()  # fmt: skip
        verdict = strict(stub, "U")
        assert verdict.verdict == pricing_pb2.VERDICT_ELIGIBLE and verdict.eligible
        assert verdict.price.amount_minor == 900


def cli(env: dict[str, str], *args: str) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-m", "pricing_service", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_seller_defined_crowds_through_the_clis(
    system: tuple[dict[str, str], Proc, Proc], tmp_path: Path
) -> None:
    env, _server, _worker = system
    T = datetime.now(UTC)
    made = cli(env, "crowds", "create", "--seller", "S", "--id", "loyal30",
               "--min-follow-days", "30", "--name", "Fans of a month")  # fmt: skip
    assert made["name"] == "sellers/S/crowds/loyal30"
    assert cli(env, "crowds", "create", "--seller", "S", "--id", "vip", "--list")["form"] == "list"
    cli(env, "rules", "upsert", "--seller", "S", "--item", "X", "--crowd", "loyal30",
        "--price", "12.00", "--currency", "CNY")  # fmt: skip
    cli(env, "rules", "upsert", "--seller", "S", "--item", "X", "--crowd", "vip",
        "--price", "10.00", "--currency", "CNY")  # fmt: skip
    write_snapshot(tmp_path / "snap", T - timedelta(minutes=1), [
        ("old", "S", T - timedelta(days=45), 0), ("young", "S", T - timedelta(days=12), 0),
    ])  # fmt: skip
    assert run_sync_worker(env, "load-snapshot", str(tmp_path / "snap")).returncode == 0
    with grpc.insecure_channel(env["PRICING_LISTEN"]) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)
        p = until_price(stub, "old", 1200)
        assert (p.price.amount_minor, p.crowd, p.crowd_id) == (
            1200, common_pb2.CROWD_KIND_SELLER_DEFINED, "loyal30"
        )  # fmt: skip
        young = page(stub, "young", explain=True)
        assert young.price.amount_minor == 1500
        why = {e.crowd_id: e.reason for e in young.evaluations}
        assert why["loyal30"] == "followed 12 days ago, this crowd needs 30"
        assert why["vip"] == "not on the list"
        # list members through the CLI, then a list file for the bigger change
        assert cli(env, "crowds", "add", "--seller", "S", "--id", "vip",
                   "--users", "young,guest")["added"] == 2  # fmt: skip
        assert until_price(stub, "young", 1000).price.amount_minor == 1000
        listing = tmp_path / "vip.csv"
        listing.write_text("user_id,action\nguest,remove\n" + "".join(
            f"member{i},add\n" for i in range(2000)))  # fmt: skip
        loaded = run_sync_worker(env, "load-list", str(listing), "--seller", "S", "--crowd", "vip")
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        report = json.loads(loaded.stdout.strip().splitlines()[-1])
        assert (report["added"], report["removed"], report["ok"]) == (2000, 1, True)
        assert page(stub, "member1999").price.amount_minor == 1000
        guest = page(stub, "guest", explain=True)
        assert guest.price.amount_minor == 1500
        assert (
            "not on the list (removed" in {e.crowd_id: e.reason for e in guest.evaluations}["vip"]
        )
        # the strict path decides with the same crowds, from the store and the primary
        r = stub.CheckDiscountStrict(
            pricing_pb2.CheckDiscountStrictRequest(user_id="member7", item_id="X"), timeout=5
        )
        assert (r.verdict, r.crowd_id, r.price.amount_minor) == (
            pricing_pb2.VERDICT_ELIGIBLE, "vip", 1000
        )  # fmt: skip
    history = subprocess.run(
        [sys.executable, "-m", "pricing_service", "crowds", "history", "--seller", "S"],
        env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.splitlines()  # fmt: skip
    assert [json.loads(line)["action"] for line in history] == ["MEMBERS", "CREATE", "CREATE"]
