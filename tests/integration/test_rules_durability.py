"""Restart durability: a writer process killed -9 mid-stream loses no acknowledged write.

The child writes rules one by one and prints each revision once its commit has returned; the
test kills it with SIGKILL while it is still writing, reopens the store and finds every
acknowledged rule (and a gapless change feed). On SQLite the test also keeps the file open in
this process throughout, as the server would be.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pricing_service.rules.factory import open_rule_store
from pricing_testing.rule_stores import BACKENDS, pg_schema, settings_for, sqlite_url

pytestmark = [pytest.mark.integration, pytest.mark.fault]

WRITER = """
import asyncio, sys
from pricing_service.config import Settings
from pricing_service.domain import CrowdKind, Money, Rule
from pricing_service.rules.factory import open_rule_store

async def main() -> None:
    store = await open_rule_store(Settings(rule_store_url=sys.argv[1]))
    n = 0
    while True:
        r, _ = await store.upsert(
            Rule("", "42", f"item-{n}", CrowdKind.ALL_FANS, Money("CNY", 100 + n)), "writer"
        )
        print(r.revision, r.item_id, flush=True)
        n += 1
        if n % 10 == 0:
            await store.upsert_many(
                [Rule("", "42", f"batch-{n}-{k}", CrowdKind.OLD_FANS, Money("CNY", 5)) for k in range(5)],
                "writer",
            )
            print("batch", n, flush=True)

asyncio.run(main())
"""


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with pg_schema(request.getfixturevalue("pg_url")) as url:
            yield url


async def test_kill_9_loses_no_acknowledged_write(store_url: str) -> None:
    observer = await open_rule_store(settings_for(store_url))  # open alongside the writer
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        store_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    acked: dict[str, int] = {}
    batches: list[int] = []
    try:
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(60):
            while len(acked) < 40:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    break
                head, value = line.split()
                if head == "batch":
                    batches.append(int(value))
                else:
                    acked[value] = int(head)
        assert len(acked) >= 40, (await proc.stderr.read()).decode()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    await observer.close()

    store = await open_rule_store(settings_for(store_url))  # "restart"
    try:
        rules, revision = await store.load_all()
        stored = {r.item_id: r for r in rules}
        for item, rev in acked.items():
            assert item in stored, f"acknowledged write {item} (revision {rev}) was lost"
            assert stored[item].revision == rev
            assert stored[item].price.amount_minor == 100 + int(item.removeprefix("item-"))
        for n in batches:  # acknowledged batches are whole
            assert all(f"batch-{n}-{k}" in stored for k in range(5))
        # whatever was in flight at the kill is either fully there or fully absent
        batch_items = [i for i in stored if i.startswith("batch-")]
        assert len(batch_items) % 5 == 0
        changes = await store.changes_since(0, 100_000)
        assert [c.revision for c in changes] == list(range(1, revision + 1))
        assert len(rules) == revision
        # and the store is writable again after the crash
        assert await store.delete(stored["item-0"].rule_id, "after-restart") == revision + 1
    finally:
        await store.close()
