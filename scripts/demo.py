#!/usr/bin/env python3
"""`make run`: the whole system on this machine with demo data.

Finds Redis (PRICING_REDIS_URL if it answers, else a private redis-server), starts
`pricing-service serve` and `sync-worker consume`, creates demo rules through the admin API -
one of them for a crowd the seller defines (`newfans`: followed at most 7 days) - loads a demo
snapshot with `sync-worker load-snapshot`, publishes a few live events with
`sync-worker publish`, prints queries to paste, and runs until Ctrl-C.
Everything it writes lives under .demo/ and the Redis namespace `demo:`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "scripts"))
import services  # noqa: E402

TOKEN = "demo-admin-token"
RULES = [  # seller, item, crowd, price (minor units, CNY)
    ("42", "1001", common_pb2.CROWD_KIND_ALL_FANS, 1990),
    ("42", "1001", common_pb2.CROWD_KIND_OLD_FANS, 1888),
    ("42", "1001", common_pb2.CROWD_KIND_PURCHASED_FANS, 1750),
    ("42", "1002", common_pb2.CROWD_KIND_ALL_FANS, 8900),
    ("7", "2001", common_pb2.CROWD_KIND_OLD_FANS, 500),
]


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m" if sys.stdout.isatty() else f"==> {msg}", flush=True)


def write_snapshot(directory: Path) -> None:
    now = datetime.now(UTC)
    rows = [
        ("alice", "42", now - timedelta(days=90), 3),  # old fan who bought: all three crowds
        ("bob", "42", now - timedelta(days=3), 0),  # new fan
        ("carol", "7", now - timedelta(days=45), 0),  # old fan of seller 7
    ]
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    with (directory / "part-00000.csv").open("w") as f:
        f.write("user_id,seller_id,followed_at,purchase_count\n")
        for user, seller, followed, count in rows:
            f.write(f"{user},{seller},{rfc3339(followed)},{count}\n")
    manifest = {
        "snapshot_time": rfc3339(now - timedelta(minutes=1)),
        "files": ["part-00000.csv"],
        "rows": len(rows),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def wait_serving(target: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"pricing-service exited; see {DEMO / 'server.log'}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"pricing-service did not become SERVING; see {DEMO / 'server.log'}")


def main() -> None:
    DEMO.mkdir(exist_ok=True)
    redis_url = services.ensure_redis(os.environ.get("PRICING_REDIS_URL", services.DEFAULT_REDIS))
    listen = os.environ.get("PRICING_LISTEN", "127.0.0.1:50051")
    env = dict(os.environ)
    env.update(
        {
            "PRICING_REDIS_URL": redis_url,
            "PRICING_REDIS_NAMESPACE": "demo:",
            "PRICING_EVENTS_STREAM": "demo:pricing:relation-events",
            "PRICING_DEAD_LETTER_STREAM": "demo:pricing:relation-events:dead",
            "PRICING_RULE_STORE_URL": f"sqlite:///{DEMO / 'pricing.db'}",
            "PRICING_LISTEN": listen,
            "PRICING_ADMIN_TOKEN": TOKEN,
            "PRICING_METRICS_PORT": env.get("PRICING_METRICS_PORT", "9464"),
            "PRICING_LOG_FORMAT": "json",
        }
    )
    say(f"Redis: {redis_url} (namespace demo:)   rule store: {DEMO / 'pricing.db'}")
    procs: list[subprocess.Popen[bytes]] = []

    def stop(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server = subprocess.Popen(
        [str(BIN / "pricing-service"), "serve"], env=env,
        stdout=(DEMO / "server.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs.append(server)
    worker = subprocess.Popen(
        [str(BIN / "sync-worker"), "consume"], env=env,
        stdout=(DEMO / "worker.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs.append(worker)
    wait_serving(listen, server)
    say(f"pricing-service is SERVING on {listen} (logs: .demo/server.log, .demo/worker.log)")

    with grpc.insecure_channel(listen) as channel:
        admin = admin_pb2_grpc.DiscountAdminServiceStub(channel)
        for seller, item, crowd, amount in RULES:
            admin.UpsertDiscountRule(
                admin_pb2.UpsertDiscountRuleRequest(
                    rule=admin_pb2.DiscountRule(
                        seller_id=seller, item_id=item, crowd=crowd,
                        price=common_pb2.Money(currency_code="CNY", amount_minor=amount),
                    )
                ),
                metadata=(("authorization", f"Bearer {TOKEN}"), ("x-actor", "demo")),
                timeout=5,
            )  # fmt: skip
        # a crowd seller 42 defines: fans of at most a week, who get a welcome price on 1002
        try:
            admin.CreateCrowd(
                admin_pb2.CreateCrowdRequest(
                    crowd=admin_pb2.Crowd(
                        seller_id="42", crowd_id="newfans", display_name="Followed this week",
                        predicate=admin_pb2.CrowdPredicate(max_follow_days=7),
                    )
                ),
                metadata=(("authorization", f"Bearer {TOKEN}"), ("x-actor", "demo")),
                timeout=5,
            )  # fmt: skip
        except grpc.RpcError as err:  # a second `make run`: the crowd is there from the first
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        admin.UpsertDiscountRule(
            admin_pb2.UpsertDiscountRuleRequest(
                rule=admin_pb2.DiscountRule(
                    seller_id="42", item_id="1002", crowd_id="newfans",
                    price=common_pb2.Money(currency_code="CNY", amount_minor=7900),
                )
            ),
            metadata=(("authorization", f"Bearer {TOKEN}"), ("x-actor", "demo")),
            timeout=5,
        )  # fmt: skip
    say(
        f"{len(RULES) + 1} demo rules upserted through DiscountAdminService, one for the crowd "
        "sellers/42/crowds/newfans (followed at most 7 days)"
    )

    write_snapshot(DEMO / "snapshot")
    subprocess.run(
        [str(BIN / "sync-worker"), "load-snapshot", str(DEMO / "snapshot")], env=env, check=True
    )
    say(
        "demo snapshot loaded (alice: old fan + buyer of 42, bob: new fan of 42, carol: old fan of 7)"
    )
    subprocess.run(
        [str(BIN / "sync-worker"), "publish", "--type", "follow", "--user", "dave", "--seller", "42"],
        env=env, check=True,
    )  # fmt: skip
    say("live event published: dave follows seller 42")
    time.sleep(0.5)

    exports = (
        f"export PRICING_LISTEN={listen} PRICING_REDIS_URL={redis_url} PRICING_REDIS_NAMESPACE=demo: "
        f"PRICING_EVENTS_STREAM=demo:pricing:relation-events "
        f"PRICING_RULE_STORE_URL=sqlite:///{DEMO / 'pricing.db'}"
    )
    venv = f"source {BIN.parent}/bin/activate"
    print(
        f"""
Ready. In another terminal:

  {venv}
  {exports}

  pricing-service price --user alice  --items 1001=25.00,1002=99.00,2001=8.00   # 17.50 (buyer), 89.00
  pricing-service price --user bob    --items 1001=25.00,1002=99.00             # 19.90, 79.00 (newfans)
  pricing-service price --user alice  --items 1002=99.00 --explain              # "followed 90 days ago, this crowd takes at most 7"
  pricing-service price --user nobody --items 1001=25.00,1002=99.00             # list prices
  pricing-service price --user alice  --items 1001=25.00 --explain              # why
  pricing-service check --user alice  --item 1001 --expected-price 17.50        # checkout: ELIGIBLE
  pricing-service crowds list --seller 42                                       # the seller's crowds

  sync-worker publish --type unfollow --user alice --seller 42                  # then ask again
  grpcurl -plaintext -d '{{"user_id":"dave","items":[{{"item_id":"1001"}}]}}' {listen} pricing.v1.PricingService/BatchGetLowestPrice

Ctrl-C stops everything.""",
        flush=True,
    )
    while True:
        for p in procs:
            if p.poll() is not None:
                print(f"a process exited ({p.args}); see .demo/*.log", file=sys.stderr)
                stop()
        time.sleep(1)


if __name__ == "__main__":
    main()
