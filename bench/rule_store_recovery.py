"""How soon the PostgreSQL rule store is usable again once PostgreSQL is back from an outage.

    python -m bench.rule_store_recovery [--outages 1.5,4,10,12] [--reconnect-timeouts 300,2]

A private PostgreSQL cluster (``initdb``/``pg_ctl`` on a free port; never the shared one) and
one :class:`~pricing_service.rules.postgres.PostgresRuleStore`. A reader asks the store for
its revision every 50 ms (each read bounded to 0.5 s, as strict checks bound theirs) while
PostgreSQL is stopped for each outage and started again; the figure is the time from the
moment PostgreSQL accepts connections again to the first read that succeeds. Each reconnect
timeout (psycopg_pool's ``reconnect_timeout``: 300 s is its default, the store's own is
:data:`~pricing_service.rules.postgres.RECONNECT_TIMEOUT_S`) gets a fresh cluster, and the
outages run in turn on it. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

from pricing_service.config import load_settings
from pricing_service.rules.postgres import RECONNECT_TIMEOUT_S, PostgresRuleStore
from pricing_testing.postgres_server import PostgresServer

PROBE_S = 0.05
READ_BUDGET_S = 0.5


async def _outage(pg: PostgresServer, store: PostgresRuleStore, seconds: float) -> float:
    """Seconds from PostgreSQL's return to the first successful read."""
    successes: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.current_revision(), READ_BUDGET_S)
                successes.append(started)
            await asyncio.sleep(PROBE_S)

    reader = asyncio.create_task(probe())
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(pg.start)  # returns once it accepts connections
        back = time.monotonic()
        while not any(t >= back for t in successes):
            if time.monotonic() - back > 120:
                raise RuntimeError("the store did not recover within 120 s")
            await asyncio.sleep(PROBE_S / 2)
        return min(t for t in successes if t >= back) - back
    finally:
        done.set()
        await reader


async def _run(outages: list[float], reconnect_timeout_s: float) -> list[float]:
    pg = PostgresServer()
    pg.init()
    try:
        settings = load_settings(rule_store_url=pg.url)
        store = await PostgresRuleStore.open(settings, reconnect_timeout_s=reconnect_timeout_s)
        try:
            await store.migrate()
            return [await _outage(pg, store, s) for s in outages]
        finally:
            await store.close()
    finally:
        pg.close()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rule_store_recovery", description=__doc__)
    p.add_argument("--outages", default="1.5,4,10,12", help="seconds PostgreSQL is down, in turn")
    p.add_argument(
        "--reconnect-timeouts",
        default=f"300,{RECONNECT_TIMEOUT_S:g}",
        help="psycopg_pool reconnect_timeout values to compare (300 = its default)",
    )
    a = p.parse_args(argv)
    outages = [float(x) for x in a.outages.split(",") if x]
    timeouts = [float(x) for x in a.reconnect_timeouts.split(",") if x]
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # its retry warnings, per attempt
    results = {}
    for timeout in timeouts:
        recovery = asyncio.run(_run(outages, timeout))
        results[f"{timeout:g}"] = [round(r, 3) for r in recovery]
        row = "  ".join(f"{o:g} s down: {r:5.2f} s" for o, r in zip(outages, recovery, strict=True))
        print(f"reconnect_timeout {timeout:>5g} s | first read after PostgreSQL is back: {row}")
    print(json.dumps({"bench": "rule_store_recovery", "outages_s": outages, "results": results}))


if __name__ == "__main__":
    main()
