"""Fault injection on a Redis Cluster: a master fails over while the load runs.

The system runs on a private 3 + 3 cluster (``redis+cluster://``): one ``pricing-service``,
two ``sync-worker consume`` processes sharing four event partitions, WAIT before XACK
(``PRICING_REDIS_WAIT_REPLICAS=1``), and a producer that counts an event as acknowledged only
once a replica has it. The master holding event partition 0 (and a third of the buyers) is
struck while pages, checkouts, admin writes, events and the churn buyers' unfollows flow:

* ``kill``: ``kill -9``; its replica takes over after the node timeout, and the dead node is
  started again later (it rejoins as a replica);
* ``failover``: a graceful ``CLUSTER FAILOVER`` on its replica.

Pass means what it means for every fault (tests/fault/test_faults.py): BatchGetLowestPrice
kept answering within its deadline (degraded where it must), CheckDiscountStrict never
answered ELIGIBLE wrongly, no event lost and no acknowledged unfollow lost (every record
equals the last-writer-wins model), no acknowledged rule write lost, no process stuck. Waits
follow the system's progress (events acknowledged and applied, answers healthy again), each
bounded, so a slow shared machine stretches the test instead of failing it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pricing_testing.load import PUBLISH_ERRORS, Load
from pricing_testing.redis_cluster import keyslot
from tests.fault.conftest import (
    ClusterSystem,
    Deployment,
    assert_recovered,
    in_thread,
    now_ms,
    started,
    unrecovered,
)

# every test starts a server: on each server runtime (tests.conftest.server_runtime)
pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("server_runtime")]


@pytest.fixture
async def cluster_running(
    cluster_system: ClusterSystem,
) -> AsyncIterator[tuple[ClusterSystem, Load]]:
    # the churn buyers' unfollows are spread over 8 s, so that some are published (and
    # applied) before, during and after the fault
    async with started(cluster_system, workers=2, unfollow_spread_s=8.0) as load:
        yield cluster_system, load


async def until(
    what: str,
    done: Callable[[], Awaitable[bool]],
    system: Deployment,
    timeout_s: float,
) -> None:
    """Poll ``done()`` until true; fail after ``timeout_s`` with the processes' logs, or as
    soon as one of them died."""
    deadline = time.monotonic() + timeout_s
    while not await done():
        dead = [p.log_path.name for p in system.servers + system.workers if not p.alive()]
        assert not dead, f"{dead} died while waiting for {what}\n{system.logs()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s}s\n{system.logs()}"
        await asyncio.sleep(0.05)


async def watermark_past(load: Load, t_ms: float) -> bool:
    """Every event published before ``t_ms`` (Redis clock) has been applied."""
    try:
        return (await load.stream_state())["watermark_ms"] > t_ms
    except PUBLISH_ERRORS:  # the load's own client meets the failover too
        return False


@pytest.mark.parametrize("fault", ["kill", "failover"])
async def test_redis_master_failover_in_the_cluster(
    cluster_running: tuple[ClusterSystem, Load], fault: str
) -> None:
    system, load = cluster_running
    cluster = system.cluster
    load.start()

    async def under_way() -> bool:  # events flowing, the first unfollows acknowledged
        return load.events_acked >= 200 and len(load.unfollow_ack_ms) >= 4

    await until("load under way", under_way, system, 30)
    victim = cluster.master_of_slot(keyslot(load.streams[0]))
    struck = now_ms()
    unfollows_before = len(load.unfollow_ack_ms)
    promoted = 0

    def strike() -> None:
        nonlocal promoted
        if fault == "kill":
            promoted = cluster.kill_master(victim, timeout_s=60)
        else:
            promoted = cluster.failover(victim, timeout_s=60)

    await in_thread(strike)
    took_over = now_ms()
    assert promoted in cluster.master_ports() and victim not in cluster.master_ports()

    # the consumers apply again on the new topology: everything published up to a moment
    # after the takeover is applied (partition 0's stream now lives on the promoted node)
    await until(
        "events applied after the takeover",
        lambda: watermark_past(load, took_over + 500),
        system,
        60,
    )
    if fault == "kill":
        await in_thread(lambda: cluster.restart_node(victim, timeout_s=60))  # now a replica
    await until("healthy answers", lambda: _healthy(load), system, 60)
    assert all(p.alive() for p in system.servers + system.workers), system.logs()
    await load.stop(timeout_s=60)
    summary = await load.check_final_state()
    load.assert_no_violations()
    assert_recovered(load)
    # unfollows were acknowledged before, across and after the fault, and none was lost
    # (check_final_state: every tombstone is in Redis; strict answers NOT_IN_CROWD)
    assert 0 < unfollows_before < len(load.unfollow_ack_ms) == len(load.pop.churn)
    worker_events = {
        json.loads(line).get("event")
        for p in system.workers
        for line in p.log().splitlines()
        if line.startswith("{")
    }
    if fault == "kill":
        outage = load.calls_between_all(struck, took_over)
        felt = [c for c in outage if c.degraded or c.code != "OK"]
        assert felt, f"nothing noticed the dead master: {len(outage)} calls"
        assert load.publish_errors > 0, summary
        # the promoted master had no replica until the old one rejoined: the consumers said
        # that they acknowledged without WAIT there
        assert "replication_unprotected" in worker_events, system.logs()
    print(fault, "victim", victim, "promoted", promoted, summary)


async def _healthy(load: Load) -> bool:
    return not unrecovered(load, now_ms())
