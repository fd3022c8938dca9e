"""List files into list crowds (``sync-worker load-list``) against real Redis.

A list file is checked whole before anything is written: bad header, bad ids, bad actions,
repeated buyers, an empty file, an unknown crowd, a time too old or in the future - each refused
with its reason (and line numbers), with no key written. A good file writes one versioned entry
per buyer (the newest change wins against API changes, in any order), a second load changes
nothing, a killed load resumes from its checkpoint, and a 10^6-member list loads.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pricing_service.config import Settings, load_settings
from pricing_service.crowds import CrowdDef
from pricing_service.domain import CrowdKey, SystemClock
from pricing_service.errors import FailedPreconditionError, InvalidArgumentError
from pricing_service.membership import derive
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from sync_worker.lists import ListLoader
from tests.integration.test_sync_model import cli, cli_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

VIP = CrowdDef("42", "vip", None, list_handle=77)
KEY: CrowdKey = ("42", "vip")


def settings(redis_url: str, namespace: str) -> Settings:
    return load_settings(redis_url=redis_url, redis_namespace=namespace)


async def registered(aredis: aioredis.Redis, namespace: str) -> MembershipStore:
    store = MembershipStore(aredis, MembershipLayout(namespace), SystemClock(), crowds={KEY: VIP})
    await store.register_lists([VIP])
    return store


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


async def buyer_keys(aredis: aioredis.Redis, namespace: str) -> list[bytes]:
    return [k async for k in aredis.scan_iter(match=f"{namespace}cm:*")]


async def test_a_list_file_adds_and_removes_and_a_second_load_changes_nothing(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    store = await registered(aredis, namespace)
    s = settings(redis_url, namespace)
    now = SystemClock().now_ms()
    # an API change made after the file's time must survive the late file, and one before not
    ttls = derive.Ttls.from_seconds(s.membership_ttl_s, s.tombstone_ttl_s, s.old_fan_min_days)
    await store.apply([derive.list_change("late", 77, now - 1000, removed=True, ttls=ttls)])
    await store.apply([derive.list_change("early", 77, now - 9000, removed=True, ttls=ttls)])
    f = write(tmp_path / "vip.csv", "user_id,action\nalice,add\nbob,ADD\ncarol,remove\n"
              "late,add\nearly,add\n")  # fmt: skip
    loader = ListLoader(s, aredis, batch_rows=2)
    report = await loader.load("42", "vip", f, at_ms=now - 5000)
    assert (report.status, report.rows, report.added, report.removed) == ("loaded", 5, 4, 1)
    members = {u for u in ["alice", "bob", "carol", "late", "early"]
               if await store.member_keys(u, [KEY]) == {KEY}}  # fmt: skip
    assert members == {"alice", "bob", "early"}
    again = await loader.load("42", "vip", f, at_ms=now - 5000)
    assert again.status == "already_loaded" and again.written == 0
    plain = write(tmp_path / "plain.csv", "user_id\ndave\n")  # no action column: adds
    assert (await loader.load("42", "vip", plain)).added == 1
    assert await store.member_keys("dave", [KEY]) == {KEY}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("user,action\nalice,add\n", "BAD_HEADER"),
        ("user_id,action\nalice,add\n,add\n", "MISSING_ID"),
        ("user_id,action\nalice,add\n" + "x" * 200 + ",add\n", "ID_TOO_LONG"),
        ("user_id,action\nalice,add\nbad\x07id,add\n", "INVALID_ID"),
        ("user_id,action\nalice,add\nbob,maybe\n", "BAD_ACTION"),
        ("user_id,action\nalice,add\nbob\n", "WRONG_COLUMN_COUNT"),
        ("user_id,action\nalice,add\nbob,add\nalice,remove\n", "DUPLICATE_USER"),
        ("user_id\n", "EMPTY_LIST"),
    ],
)
async def test_a_bad_file_is_refused_whole_and_nothing_is_written(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path, text: str, reason: str
) -> None:
    await registered(aredis, namespace)
    loader = ListLoader(settings(redis_url, namespace), aredis)
    with pytest.raises(InvalidArgumentError) as err:
        await loader.load("42", "vip", write(tmp_path / "bad.csv", text))
    assert err.value.reason == reason
    if reason not in ("BAD_HEADER", "EMPTY_LIST"):
        assert err.value.violations[0].field.startswith("line ")  # where, in the file
    assert await buyer_keys(aredis, namespace) == []


async def test_refusals_of_the_crowd_and_the_time(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    await registered(aredis, namespace)
    s = settings(redis_url, namespace)
    loader = ListLoader(s, aredis)
    f = write(tmp_path / "ok.csv", "user_id\nalice\n")
    cases: list[tuple[str, int | None, str]] = [
        ("nope", None, "CROWD_NOT_FOUND"),
        ("vip", SystemClock().now_ms() - (s.snapshot_max_age_s + 60) * 1000, "LIST_TOO_OLD"),
        ("vip", SystemClock().now_ms() + 3_600_000, "LIST_IN_FUTURE"),
    ]
    for crowd, at, reason in cases:
        with pytest.raises(FailedPreconditionError) as err:
            await loader.load("42", crowd, f, at_ms=at)
        assert err.value.reason == reason
    assert await buyer_keys(aredis, namespace) == []


async def test_a_killed_load_resumes_from_its_checkpoint(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    store = await registered(aredis, namespace)
    s = settings(redis_url, namespace)
    f = write(tmp_path / "big.csv", "user_id\n" + "".join(f"m{i}\n" for i in range(1000)))
    at = SystemClock().now_ms() - 1000

    class Crash(Exception):
        pass

    loader = ListLoader(s, aredis, batch_rows=100)
    calls = 0
    real = loader.store.apply_args

    async def crashing(by_user: dict[str, list[str | bytes]], **kw: int) -> object:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise Crash
        return await real(by_user, **kw)

    loader.store.apply_args = crashing  # type: ignore[assignment,method-assign]
    with pytest.raises(Crash):
        await loader.load("42", "vip", f, at_ms=at)
    done = [u for u in (f"m{i}" for i in range(1000)) if await store.member_keys(u, [KEY])]
    assert len(done) == 300
    resumed = await ListLoader(s, aredis, batch_rows=100).load("42", "vip", f, at_ms=at)
    assert resumed.status == "loaded" and resumed.written == 700  # from the checkpoint
    for i in range(0, 1000, 97):
        assert await store.member_keys(f"m{i}", [KEY]) == {KEY}


async def test_a_million_member_list_loads(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    store = await registered(aredis, namespace)
    s = settings(redis_url, namespace)
    n = 1_000_000
    f = tmp_path / "million.csv"
    with f.open("w") as out:
        out.write("user_id\n")
        out.writelines(f"buyer-{i:07d}\n" for i in range(n))
    t0 = time.monotonic()
    report = await ListLoader(s, aredis).load("42", "vip", f)
    elapsed = time.monotonic() - t0
    assert (report.status, report.added, report.written) == ("loaded", n, n)
    for i in (0, 1, 4242, 999_999):
        assert await store.member_keys(f"buyer-{i:07d}", [KEY]) == {KEY}
    assert await store.member_keys("buyer-1000000", [KEY]) == frozenset()
    print(f"10^6 members loaded in {elapsed:.1f}s ({n / elapsed:,.0f}/s)")


def test_the_cli_prints_a_report_and_refuses_with_exit_code_1(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    env = cli_env(redis_url, namespace)
    f = write(tmp_path / "vip.csv", "user_id\nalice\n")
    res = cli("load-list", str(f), "--seller", "42", "--crowd", "vip", env=env)
    assert res.returncode == 1 and "CROWD_NOT_FOUND" in res.stderr  # not registered
    res = cli("load-list", str(f), "--seller", "42", "--crowd", "vip", "--at", "yesterday",
              env=env)  # fmt: skip
    assert res.returncode == 2 and "RFC 3339" in res.stderr
