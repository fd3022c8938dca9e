"""Fault injection: each fault strikes the real processes while load runs, then the final state
is checked against the model (pricing_testing/load/).

Pass means, for every fault: BatchGetLowestPrice kept answering within its deadline (degraded
where it must), CheckDiscountStrict never answered ELIGIBLE wrongly and refused (UNAVAILABLE)
while it could not prove, no event lost (every record equals the model, nothing pending, dead
letters only for poison), no acknowledged rule write lost, no process stuck (every process
exits 0 on SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from pricing.v1 import pricing_pb2, pricing_pb2_grpc
from pricing_testing.load import ITEM, Load
from pricing_testing.postgres_server import PostgresServer
from tests.fault.conftest import (
    FAULT_ENV,
    STRICT_MAX_LAG_MS,
    System,
    assert_mostly_fresh,
    assert_recovered,
    in_thread,
    now_ms,
    wait_recovered,
)

# every test starts a server: on each server runtime (tests.conftest.server_runtime)
pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("server_runtime")]
BUDGET_MS = int(FAULT_ENV["PRICING_MEMBERSHIP_BUDGET_MS"])


def rows_done(checkpoints: dict[Any, Any]) -> int:
    return sum(int(json.loads(v)["offset"]) for v in checkpoints.values())


#: argv: Redis URL, namespace, rows; stdin: the loader's pid. Prints "ready", then, once the
#: loader's checkpoints count that many rows, SIGSTOPs it and prints the checkpoint key.
_FREEZE_POLLER = """
import json, os, signal, sys, time
import redis
url, namespace, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = redis.Redis.from_url(url, socket_timeout=5)
client.ping()
print("ready", flush=True)
pid = int(sys.stdin.readline())
deadline = time.monotonic() + 20
keys = []
while time.monotonic() < deadline:
    # the checkpoint key, found once (a full SCAN of the buyers' keys takes many round trips),
    # then only its fields are read
    keys = keys or list(client.scan_iter(match=namespace + "sync:snapshot:*", count=10_000))
    for key in keys:
        done = sum(int(json.loads(v)["offset"]) for v in client.hgetall(key).values())
        if done >= rows:
            os.kill(pid, signal.SIGSTOP)
            print(key.decode(), flush=True)
            sys.exit(0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the loader ended before it was frozen")
    time.sleep(0.0005)
sys.exit("the load never got under way")
"""


def start_freeze_poller(url: str, namespace: str, rows: int) -> subprocess.Popen[str]:
    """The :data:`_FREEZE_POLLER` process (a thread of the test would share the GIL)."""
    return subprocess.Popen(
        [sys.executable, "-c", _FREEZE_POLLER, url, namespace, str(rows)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_redis_sigkill_and_restart(running: tuple[System, Load]) -> None:
    system, load = running
    load.start()
    await asyncio.sleep(1.0)
    await in_thread(system.redis.kill)  # returns once the process is gone
    killed = now_ms()  # (taken before the kill, a loaded host let calls finish after it)
    await asyncio.sleep(1.0)
    restarted = now_ms()  # (calls from here on may find Redis back)
    await in_thread(system.redis.start)  # same port, same AOF
    await wait_recovered(load, settle_s=2.5)
    await load.stop()
    summary = await load.check_final_state()
    load.assert_no_violations()
    during = load.calls_between("BatchGetLowestPrice", killed + 100, restarted - 100)
    fresh = [(c.user, c.start_ms - killed) for c in during if not c.degraded]
    assert during and not fresh, f"undegraded answers without Redis: {fresh[:5]} of {len(during)}"
    refused = load.calls_between("CheckDiscountStrict", killed + 100, restarted)
    assert refused and all(c.code != "OK" for c in refused), "strict answered without Redis"
    assert_recovered(load)
    assert load.publish_errors > 0, summary  # the producers felt the outage too
    print(summary)


async def test_redis_hung_by_sigstop_then_sigcont(running: tuple[System, Load]) -> None:
    system, load = running
    load.start()
    await asyncio.sleep(1.0)
    await in_thread(system.redis.pause)
    stopped = now_ms()  # after SIGSTOP was sent: the window starts when Redis is stopped
    await asyncio.sleep(2.0)
    resuming = now_ms()
    await in_thread(system.redis.resume)
    await wait_recovered(load, settle_s=2.5)
    await load.stop()
    summary = await load.check_final_state()
    load.assert_no_violations()
    # (a call that starts less than one membership budget before SIGCONT may get its answer)
    during = load.calls_between("BatchGetLowestPrice", stopped + 100, resuming - BUDGET_MS - 100)
    fresh = [(c.user, c.start_ms - stopped) for c in during if not c.degraded]
    assert during and not fresh, f"undegraded answers from a hung Redis: {fresh[:5]}"
    hung = [  # calls that ended well inside the outage (they waited for Redis)
        c
        for c in load.calls_between("CheckDiscountStrict", stopped - 2000, resuming)
        if stopped + 300 < c.end_ms < resuming
    ]
    assert hung and all(c.code != "OK" for c in hung), "strict answered from a hung Redis"
    assert_recovered(load)
    print(summary)


@pytest.mark.parametrize("mode", ["ALL", "WRITE"])
async def test_client_pause(running: tuple[System, Load], mode: str) -> None:
    _, load = running
    load.start()
    await asyncio.sleep(1.0)
    asked = now_ms()
    await load.redis.client_pause(2000, all=mode == "ALL")
    paused = now_ms()  # in force from some moment between asked and now: for 2 s
    await asyncio.sleep(2.0)
    unpaused = asked + 2000
    await wait_recovered(load, settle_s=2.5)
    await load.stop()
    summary = await load.check_final_state()
    load.assert_no_violations()
    batch = load.calls_between("BatchGetLowestPrice", paused + 100, unpaused - BUDGET_MS - 100)
    strict = load.calls_between("CheckDiscountStrict", paused + 100, unpaused - 100)
    if mode == "ALL":  # nothing answers: degrade, refuse
        assert batch and all(c.degraded for c in batch)
        ended = [
            c
            for c in load.calls_between("CheckDiscountStrict", paused - 2000, unpaused)
            if paused + 300 < c.end_ms < unpaused
        ]
        assert ended and all(c.code != "OK" for c in ended)
    else:  # reads answer, but the watermark cannot move: strict refuses once it is too old
        assert_mostly_fresh(batch, "reads work during CLIENT PAUSE WRITE, but were degraded")
        late = [c for c in strict if c.start_ms > paused + STRICT_MAX_LAG_MS + 300]
        # refused promptly (SYNC_LAGGING): the strict path's read-only script is not held by
        # the write pause
        assert all(c.code == "UNAVAILABLE" for c in late), late
        assert any(c.code != "OK" for c in strict), summary
    assert_recovered(load)
    print(summary)


async def test_strict_answers_promptly_while_writes_are_paused(
    running: tuple[System, Load],
) -> None:
    _, load = running
    stub = pricing_pb2_grpc.PricingServiceStub(load.channels[0])
    await load.redis.client_pause(1500, all=False)
    start = time.monotonic()
    r = await stub.CheckDiscountStrict(
        pricing_pb2.CheckDiscountStrictRequest(user_id=load.pop.fans[0], item_id=ITEM), timeout=3
    )
    took = time.monotonic() - start
    assert r.verdict == pricing_pb2.VERDICT_ELIGIBLE
    assert took < 0.3, f"{took:.2f} s for a read that needs no write"


async def test_sync_worker_sigkill_mid_stream(running: tuple[System, Load]) -> None:
    """The consumer dies holding a batch; a new one reclaims it; strict refuses meanwhile."""
    system, load = running
    load.start()
    await asyncio.sleep(0.5)
    # a backlog, so that the consumer is busy with a batch when it dies
    burst = [
        ("follow" if i % 2 == 0 else "unfollow", f"burst{i % 500}", "7", 0) for i in range(4000)
    ]
    for i, (kind, user, seller, _) in enumerate(burst):
        burst[i] = (kind, user, seller, load._fact_time(user))
    await load._publish(burst, give_up_s=10)
    victim = system.workers[-1]
    held = 0
    deadline = time.monotonic() + 10
    while not held:  # freeze the consumer while it holds a batch, then kill it
        assert time.monotonic() < deadline, "the consumer never held a batch"
        if (await load.stream_state())["pending"] == 0:
            await asyncio.sleep(0.002)
            continue
        victim.proc.send_signal(signal.SIGSTOP)
        held = (await load.stream_state())["pending"]
        if not held:
            victim.proc.send_signal(signal.SIGCONT)
    await in_thread(victim.kill)
    killed = now_ms()
    assert (await load.stream_state())["pending"] == held
    await asyncio.sleep(2.0)
    restarting = now_ms()
    system.start_worker()
    await wait_recovered(load, settle_s=3.0)
    await load.stop()
    summary = await load.check_final_state()
    load.assert_no_violations()
    blind = load.calls_between("CheckDiscountStrict", killed + 1300, restarting)
    assert blind and all(c.code == "UNAVAILABLE" for c in blind), (
        "strict answered while the worker was dead"
    )
    assert_recovered(load)
    print(held, summary)


async def test_sync_worker_sigkill_mid_snapshot_batch(running: tuple[System, Load]) -> None:
    """The snapshot loader dies mid-load while events flow; a rerun resumes; the snapshot
    (cut before the unfollows) resurrects nobody."""
    from sync_worker.snapshot_gen import SnapshotRow, write_snapshot  # noqa: PLC0415

    system, load = running
    cut = int(now_ms()) - 600_000
    rows = [
        SnapshotRow(u, "42", cut - (40 if i % 2 else 3) * 86_400_000, i % 2)
        for i, u in enumerate(load.pop.fans + load.pop.churn)
    ] + [SnapshotRow(f"snap{i}", str(200 + i % 50), cut - i * 1000, i % 3) for i in range(60_000)]
    snap = system.tmp / "snapshot"
    write_snapshot(snap, rows, cut, part_rows=10_000)
    for r in rows:  # (before the load starts: this blocks the event loop for a while)
        load.model.snapshot_row(r.user_id, r.seller_id, r.followed_at_ms, r.purchase_count, cut)
    load.start()
    await asyncio.sleep(0.5)
    env = dict(system.env, PRICING_SNAPSHOT_BATCH_ROWS="500")
    from pricing_testing.procs import run_sync_worker, sync_worker  # noqa: PLC0415

    # The loader is frozen (SIGSTOP) once a few batches are in, by a poller process of its own:
    # a thread here shares the GIL with the busy load and could see the checkpoints too late,
    # after a fast loader had finished (seen: every row done before the freeze landed).
    poller = start_freeze_poller(system.redis.url, system.namespace, 3000)
    try:
        assert poller.stdout is not None and poller.stdin is not None
        assert (await asyncio.to_thread(poller.stdout.readline)).strip() == "ready"
        loader = sync_worker(env, system.tmp / "loader.log", "load-snapshot", str(snap))
        poller.stdin.write(f"{loader.proc.pid}\n")
        poller.stdin.flush()
        out = (await asyncio.to_thread(poller.communicate, timeout=60))[0]
    finally:
        if poller.poll() is None:
            poller.kill()
    assert poller.returncode == 0, out + "\n" + loader.log()
    ckey = out.strip().splitlines()[-1]
    await in_thread(loader.kill)
    done = rows_done(await load.redis.hgetall(ckey))
    assert 3000 <= done < len(rows), done
    rerun = await asyncio.to_thread(run_sync_worker, env, "load-snapshot", str(snap))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert '"status": "loaded"' in rerun.stdout, rerun.stdout
    await asyncio.sleep(1.0)
    await load.stop()
    summary = await load.check_final_state()
    load.assert_no_violations()
    print(done, summary)


async def test_pricing_server_sigterm_under_load(system: System, server_runtime: str) -> None:
    """Two servers share the port (a rolling restart); one gets SIGTERM under load while calls
    are held in flight (Redis paused for 300 ms): it drains them and exits 0. No answer is lost:
    every call the server logged as answered reached its client as answered. No call fails
    except, possibly, those that reach the server in the very moment it shuts down, before a
    handler took them: gRPC core answers those CANCELLED (grpc/grpc#41785). On grpcio that moment is
    the signal (it stops taking streams at once and finishes the open ones). The native
    runtime cannot do that (pygrpc-native 0.5's close() ends open streams with its GOAWAY), so
    it serves every call through the drain and closes once none has been in flight for a few
    milliseconds: that moment is its close, which it logs; a call it ends there was never
    served, and its client learns of it no earlier than the close (a caller can fail more than
    once there: a call sent on the connection after its GOAWAY, before the channel moved)."""
    system.env["PRICING_MEMBERSHIP_BUDGET_MS"] = "450"
    first = system.start_server()
    system.start_server()
    system.start_worker()
    load = system.load(batch_concurrency=4, strict_concurrency=2)
    load.channels += [
        grpc.aio.insecure_channel(system.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(3)
    ]
    try:
        await load.seed_state()
        await load.wait_strict_ready()
        load.start()
        await asyncio.sleep(1.0)
        await load.redis.client_pause(300)  # every call now waits for Redis: in flight
        await asyncio.sleep(0.1)
        signalled = now_ms()
        first.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(first.proc.wait, 15)
        exited = now_ms()
        await asyncio.sleep(1.5)
        await load.stop()
        summary = await load.check_final_state()
    finally:
        await load.close()
    assert code == 0, first.log()
    assert "server_stopped" in first.log()
    print("signalled", signalled, "exited", exited)
    lines = [json.loads(line) for line in first.log().splitlines() if line.startswith("{")]
    answered = {e["request_id"]: e["code"] for e in lines if e.get("event") == "rpc_finished"}
    assert answered, "the server logged no call"
    # the server finished these with one code, their clients saw another (no answer)
    lost = [c for c in load.calls if answered.get(c.request_id, c.code) != c.code]
    assert not lost, [(c, answered[c.request_id]) for c in lost]
    before = [c for c in load.calls if c.start_ms < signalled]
    assert all(c.code == "OK" for c in before), [c for c in before if c.code != "OK"][:5]
    held = [c for c in before if c.end_ms > signalled + 100]
    assert held, "no call was in flight across the SIGTERM"
    racing = [c for c in load.calls if c.code != "OK"]
    allowed: tuple[str, ...] = ("CANCELLED", "UNAVAILABLE")
    if server_runtime == "native":
        # a call sent in the instant of the close can also wait out the client's reconnect
        # backoff (1 s) after the connection is cut, and end DEADLINE_EXCEEDED
        allowed = ("CANCELLED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
        closing = next(e["at_ms"] for e in lines if e.get("event") == "native_runtime_closing")
        # ended by the close, not refused before it (at_ms is whole milliseconds)
        assert all(c.end_ms >= closing for c in racing), (closing, racing)
    else:
        moment = (signalled, signalled + 20)
        assert all(moment[0] <= c.start_ms <= moment[1] for c in racing), (moment, racing)
    assert all(c.code in allowed for c in racing), racing
    others = [v for v in load.violations if not any(c in v.detail for c in allowed)]
    assert not others, others
    after = load.calls_between("BatchGetLowestPrice", exited, now_ms())
    assert after and all(c.code == "OK" for c in after)
    codes = system.stop_all()
    assert all(c == 0 for c in codes.values()), codes
    print(len(held), "held;", len(racing), "racing;", summary)


async def loaded_on_private_pg(system: System, pg: PostgresServer, **env: str) -> Load:
    """Server + worker with the rule store on ``pg``, seeded, the load running for a second."""
    system.env["PRICING_RULE_STORE_URL"] = pg.url
    system.env["PRICING_RULE_STORE_BUSY_TIMEOUT_MS"] = "500"
    system.env.update(env)
    system.start_server()
    system.start_worker()
    load = system.load(admin_interval_s=0.05)
    try:
        await load.seed_state()
        await load.wait_strict_ready()
        load.start()
        await asyncio.sleep(1.0)
    except BaseException:
        await load.close()
        raise
    return load


@dataclass(frozen=True, slots=True)
class Outage:
    """When a rule-store outage of :func:`rule_store_outage` began and ended (ms)."""

    starting: float  # just before the fault
    started: float  # the fault in effect
    ending: float  # just before the recovery
    summary: dict[str, Any]  # the load's final state check


async def rule_store_outage(
    load: Load, fault: Callable[[], Any], recover: Callable[[], Any], seconds: float, item: str
) -> Outage:
    """``fault`` for ``seconds`` under ``load``, then ``recover``; the load runs on until it
    looks recovered, then its final state is checked against the model and a rule written now
    must be acknowledged (the index follows the store again). The load is closed; ``recover``
    runs even if something failed before it."""
    recovered = False
    try:
        starting = now_ms()
        await in_thread(fault)
        started = now_ms()
        await asyncio.sleep(seconds)
        ending = now_ms()
        await in_thread(recover)
        recovered = True
        await wait_recovered(load, settle_s=2.5)
        await load.stop()
        summary = await load.check_final_state()
        await load.upsert_rule("42", item, 777)
    finally:
        if not recovered:
            with contextlib.suppress(Exception):
                recover()
        await load.close()
    return Outage(starting, started, ending, summary)


async def test_postgresql_restart(system: System, private_pg: PostgresServer) -> None:
    """The rule store goes away and comes back: pages keep their prices (index), strict
    refuses (it reads the store), admin writes fail UNAVAILABLE, acknowledged ones survive."""
    load = await loaded_on_private_pg(system, private_pg)
    out = await rule_store_outage(load, private_pg.stop, private_pg.start, 1.5, "after-restart")
    summary = out.summary
    load.assert_no_violations()
    # strict calls made while PostgreSQL was down (one started just before the restart may
    # get a connection once it is back, since the pool finds it again within ~0.5 s)
    down = [
        c
        for c in load.calls_between("CheckDiscountStrict", out.started + 100, out.ending)
        if c.end_ms < out.ending
    ]
    # refused: UNAVAILABLE, or the pool's wait for a connection outlasts the 1 s deadline
    assert down and all(c.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") for c in down), summary
    pages = load.calls_between("BatchGetLowestPrice", out.starting, out.ending)
    assert_mostly_fresh(pages, "pages need no rule store, but were degraded")
    assert load.admin_failures and set(load.admin_failures) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert_recovered(load)
    codes = system.stop_all()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{system.logs()}"
    print(summary)


async def test_postgresql_hung_under_a_bounded_rule_index(
    system: System, private_pg: PostgresServer
) -> None:
    """The rule index holds 4 items, a page asks for 20: every page reads its misses from
    the store. The store hangs (SIGSTOP): pages still answer within their deadline (the misses
    at list price, degraded), strict refuses, and all is fresh again once it is back."""
    load = await loaded_on_private_pg(system, private_pg, PRICING_RULE_INDEX_MAX_ITEMS="4")
    before = load.calls_between("BatchGetLowestPrice", 0, now_ms())
    out = await rule_store_outage(load, private_pg.pause, private_pg.resume, 2.5, "after-hang")
    summary = out.summary
    load.assert_no_violations()  # includes: every page answered OK within its deadline
    assert_mostly_fresh(before, "pages with a healthy store (misses read from it)")
    pages = load.calls_between("BatchGetLowestPrice", out.started + 300, out.ending)
    assert pages and sum(c.degraded for c in pages) > len(pages) // 2, summary
    # strict calls (1 s deadline) that started and ended inside the hang
    down = load.calls_between("CheckDiscountStrict", out.started + 300, out.ending - 1100)
    assert down and all(c.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") for c in down), summary
    assert_recovered(load)
    codes = system.stop_all()
    assert all(c == 0 for c in codes.values()), f"{codes}\n{system.logs()}"
    print(summary)


async def test_sync_worker_hung_by_sigstop(running: tuple[System, Load]) -> None:
    """A hung consumer applies nothing: strict must refuse once the watermark is too old."""
    system, load = running
    worker = system.workers[-1]
    load.start()
    await asyncio.sleep(0.5)
    stopped = now_ms()
    worker.proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(2.5)
    resumed = now_ms()
    worker.proc.send_signal(signal.SIGCONT)
    await wait_recovered(load, settle_s=2.0)
    await load.stop()
    summary = await load.check_final_state()
    load.assert_no_violations()
    blind = load.calls_between("CheckDiscountStrict", stopped + 1300, resumed)
    assert blind and all(c.code == "UNAVAILABLE" for c in blind), summary
    assert_recovered(load)


async def test_the_oracle_catches_a_server_that_grants_unproven_discounts(system: System) -> None:
    """Control: a server told to tolerate a 10-minute-old watermark grants the discount to
    buyers whose unfollow it has not applied (the consumer is hung), and the load's strict
    check must flag exactly that. Proves the safety checks of the other tests can fail."""
    system.env["PRICING_STRICT_MAX_LAG_MS"] = "600000"
    system.start_server()
    worker = system.start_worker()
    load = system.load(unfollow_spread_s=1.0)
    try:
        await load.seed_state()
        await load.wait_strict_ready()
        worker.proc.send_signal(signal.SIGSTOP)
        load.start(batch=False, admin=False, events=False)
        await asyncio.sleep(3.0)
        await load.stop()
        worker.proc.send_signal(signal.SIGCONT)
        await load.settle()
    finally:
        await load.close()
    wrong = [v for v in load.violations if v.what == "strict_wrongly_eligible"]
    assert wrong, load.summary()
    assert {v.what for v in load.violations} == {"strict_wrongly_eligible"}
    codes = system.stop_all()
    assert all(c == 0 for c in codes.values()), codes
