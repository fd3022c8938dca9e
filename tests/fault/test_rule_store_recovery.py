"""The PostgreSQL rule store after an outage: usable again promptly once PostgreSQL is back,
however long it was away (psycopg_pool's reconnect attempts back off 1, 2, 4, 8 ... s: with its
default ``reconnect_timeout`` the store stayed unusable for 1.6-5.8 s after a 10-12 s outage,
``python -m bench.rule_store_recovery``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pricing_service.config import load_settings
from pricing_service.errors import UnavailableError
from pricing_service.rules.postgres import PostgresRuleStore
from pricing_testing.postgres_server import PostgresServer

pytestmark = pytest.mark.fault


async def test_reads_succeed_within_a_second_and_a_half_of_postgresql_returning(
    private_pg: PostgresServer,
) -> None:
    store = await PostgresRuleStore.open(load_settings(rule_store_url=private_pg.url))
    try:
        await store.migrate()
        revision = await store.current_revision()
        await asyncio.to_thread(private_pg.stop)
        # reads during the outage fail as the store's own error, within their budget
        down_until = time.monotonic() + 10
        refusals = 0
        while time.monotonic() < down_until:
            with pytest.raises((UnavailableError, TimeoutError)):
                await asyncio.wait_for(store.current_revision(), 0.5)
            refusals += 1
            await asyncio.sleep(0.05)
        assert refusals >= 10
        await asyncio.to_thread(private_pg.start)  # returns once it accepts connections
        back = time.monotonic()
        while True:
            try:
                assert await asyncio.wait_for(store.current_revision(), 0.5) == revision
                break
            except (UnavailableError, TimeoutError):
                assert time.monotonic() - back < 1.5, "the store is still unusable"
                await asyncio.sleep(0.05)
    finally:
        await store.close()
