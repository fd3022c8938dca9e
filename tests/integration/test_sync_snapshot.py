"""Snapshot loading against real Redis: validation, checkpoints, crashes, races, parallel parts."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from unittest import mock

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing_service.config import Settings, load_settings
from pricing_service.domain import Crowd, CrowdKind, SystemClock
from pricing_service.errors import FailedPreconditionError, InvalidArgumentError, PricingError
from pricing_service.membership.derive import DAY_MS, Ttls, snapshot_row, unfollow
from pricing_service.membership.layout import MembershipLayout
from pricing_service.membership.store import MembershipStore
from sync_worker.events import EventPublisher, make_event
from sync_worker.snapshot import HEADER, SnapshotLoader, count_rows
from sync_worker.snapshot import manifest as snapshot_module
from sync_worker.snapshot.manifest import csv_rows as _csv_rows
from sync_worker.snapshot_gen import SnapshotRow, realistic_rows, write_snapshot
from tests.integration.test_sync_model import Model, cli, cli_env, popen, redis_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
BUILTIN = (CrowdKind.ALL_FANS, CrowdKind.OLD_FANS, CrowdKind.PURCHASED_FANS)

HOUR_MS = 3_600_000


def now_ms() -> int:
    return SystemClock().now_ms()


def make_settings(url: str, ns: str, **kw: object) -> Settings:
    return load_settings(redis_url=url, redis_namespace=ns, **kw)


def ttls(s: Settings) -> Ttls:
    return Ttls.from_seconds(s.membership_ttl_s, s.tombstone_ttl_s, s.old_fan_min_days)


def model_of(rows: list[SnapshotRow], cut: int, s: Settings) -> Model:
    m = Model()
    for r in rows:
        m.apply(
            snapshot_row(r.user_id, r.seller_id, r.followed_at_ms, r.purchase_count, cut, ttls(s)),
            now_ms(),
        )
    return m


def keys_in(url: str, ns: str) -> list[bytes]:
    c = redis.Redis.from_url(url)
    try:
        return list(c.scan_iter(match=f"{ns}*", count=1000))
    finally:
        c.close()


async def load(s: Settings, directory: Path, **kw: object) -> dict[str, object]:
    client = aioredis.Redis.from_url(s.redis_url, socket_timeout=10)
    try:
        report = await SnapshotLoader(s, client, **kw).load(directory)  # type: ignore[arg-type]
        return report.as_dict()
    finally:
        await client.aclose()


@pytest.fixture
def cut() -> int:
    return now_ms() - HOUR_MS


@pytest.fixture
def rows(cut: int) -> list[SnapshotRow]:
    return list(realistic_rows(3000, cut, seed=3, sellers=300))


# --- loading -------------------------------------------------------------------------------------
async def test_load_matches_the_model_and_a_second_load_changes_nothing(
    redis_url: str, namespace: str, tmp_path: Path, cut: int, rows: list[SnapshotRow]
) -> None:
    s = make_settings(redis_url, namespace)
    write_snapshot(tmp_path, rows, cut, part_rows=1000)
    report = await load(s, tmp_path, batch_rows=250)
    assert report["status"] == "loaded"
    assert report["rows_read"] == len(rows)
    assert report["rejected"] == {}
    model = model_of(rows, cut, s).live(now_ms())
    assert report["memberships_written"] == len(model) == len(rows)  # one fact field per row
    state = redis_state(redis_url, namespace, now_ms())
    assert state == model
    expires = -(-(cut + s.membership_ttl_s * 1000) // 1000) * 1000
    assert all(f.follow is not None and f.follow.version_ms == cut
               and f.follow.expires_ms == expires for f in state.values())  # fmt: skip
    assert any(f.purchases is not None for f in state.values()), "some rows have purchases"

    again = await load(s, tmp_path)
    assert again["status"] == "already_loaded"
    assert again["memberships_written"] == 0
    assert redis_state(redis_url, namespace, now_ms()) == state


async def test_parquet_parts_load_like_csv(
    redis_url: str, namespace: str, tmp_path: Path, cut: int, rows: list[SnapshotRow]
) -> None:
    s = make_settings(redis_url, namespace)
    write_snapshot(tmp_path, rows, cut, part_rows=1200, fmt="parquet")
    report = await load(s, tmp_path, batch_rows=500)
    assert report["status"] == "loaded"
    assert report["rows_read"] == len(rows)
    assert redis_state(redis_url, namespace, now_ms()) == model_of(rows, cut, s).live(now_ms())


async def test_replaying_a_loaded_snapshot_without_checkpoints_is_harmless(
    redis_url: str, namespace: str, tmp_path: Path, cut: int, rows: list[SnapshotRow]
) -> None:
    s = make_settings(redis_url, namespace)
    write_snapshot(tmp_path, rows, cut, part_rows=1000)
    await load(s, tmp_path)
    state = redis_state(redis_url, namespace, now_ms())
    c = redis.Redis.from_url(redis_url)
    c.delete(*c.scan_iter(match=f"{namespace}sync:snapshot:*"))
    c.close()
    report = await load(s, tmp_path)
    assert report["status"] == "loaded"
    assert report["memberships_written"] == 0
    assert report["skipped_stale"] == len(state)
    assert redis_state(redis_url, namespace, now_ms()) == state


# --- refusals: nothing written -------------------------------------------------------------------
def _write_manifest(d: Path, **doc: object) -> None:
    (d / "manifest.json").write_text(json.dumps(doc))


def _csv(d: Path, name: str, lines: list[str]) -> None:
    (d / name).write_text(
        "\n".join(["user_id,seller_id,followed_at,purchase_count", *lines]) + "\n"
    )


GOOD_ROW = "u1,42,2025-06-01T00:00:00Z,1"


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("no_manifest", "MISSING_MANIFEST"),
        ("bad_json", "BAD_MANIFEST"),
        ("no_time", "BAD_SNAPSHOT_TIME"),
        ("naive_time", "BAD_SNAPSHOT_TIME"),
        ("no_files", "BAD_FILES"),
        ("missing_part", "MISSING_PART"),
        ("path_escape", "BAD_FILES"),
        ("bad_format", "BAD_FORMAT"),
        ("rows_mismatch", "ROW_COUNT_MISMATCH"),
        ("bad_rows", "BAD_ROWS"),
        ("bad_header", "BAD_HEADER"),
        ("stale", "SNAPSHOT_TOO_OLD"),
        ("future", "SNAPSHOT_IN_FUTURE"),
    ],
)
async def test_bad_snapshots_are_refused_before_any_write(
    redis_url: str, namespace: str, tmp_path: Path, setup: str, reason: str
) -> None:
    s = make_settings(redis_url, namespace)
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    _csv(tmp_path, "p0.csv", [GOOD_ROW, "u2,42,2025-06-01T00:00:00Z,0"])
    _csv(tmp_path, "p1.csv", ["u3,42,2025-06-01T00:00:00Z,0"])
    doc: dict[str, object] = {"snapshot_time": fresh, "files": ["p0.csv", "p1.csv"], "rows": 3}
    if setup == "no_manifest":
        doc = {}
    elif setup == "bad_json":
        (tmp_path / "manifest.json").write_text("{")
    elif setup == "no_time":
        del doc["snapshot_time"]
    elif setup == "naive_time":
        doc["snapshot_time"] = fresh.rstrip("Z")
    elif setup == "no_files":
        doc["files"] = []
    elif setup == "missing_part":
        doc["files"] = ["p0.csv", "p9.csv"]
    elif setup == "path_escape":
        doc["files"] = ["../p0.csv"]
    elif setup == "bad_format":
        (tmp_path / "p2.txt").write_text("x")
        doc["files"] = ["p0.csv", "p2.txt"]
    elif setup == "rows_mismatch":
        doc["rows"] = 4
    elif setup == "bad_rows":
        doc["rows"] = -1
    elif setup == "bad_header":
        (tmp_path / "p1.csv").write_text("user,seller,at,count\nu3,42,2025-06-01T00:00:00Z,0\n")
    elif setup == "stale":
        doc["snapshot_time"] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - s.snapshot_max_age_s - 60)
        )
    elif setup == "future":
        doc["snapshot_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    if doc and setup != "bad_json":
        _write_manifest(tmp_path, **doc)
    with pytest.raises(PricingError) as exc:
        await load(s, tmp_path)
    assert exc.value.reason == reason
    assert isinstance(exc.value, InvalidArgumentError | FailedPreconditionError)
    assert keys_in(redis_url, namespace) == []


def test_cli_refusal_exits_non_zero_and_says_why(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 40 * 3600))
    _csv(tmp_path, "p0.csv", [GOOD_ROW])
    _write_manifest(tmp_path, snapshot_time=old, files=["p0.csv"], rows=1)
    res = cli("load-snapshot", str(tmp_path), env=cli_env(redis_url, namespace))
    assert res.returncode == 1
    assert "SNAPSHOT_TOO_OLD" in res.stderr
    assert keys_in(redis_url, namespace) == []


# --- malformed rows ------------------------------------------------------------------------------
def test_malformed_rows_are_skipped_and_counted(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    good = [f"u{i},42,2025-06-01T00:00:00Z,{i % 3}" for i in range(300)]
    bad = [",42,2025-06-01T00:00:00Z,1", "u9,42,yesterday,1", "u9,42,2025-06-01T00:00:00Z,-2"]
    _csv(tmp_path, "p0.csv", good[:150] + bad + good[150:])
    _write_manifest(tmp_path, snapshot_time=fresh, files=["p0.csv"], rows=303)
    env = cli_env(redis_url, namespace, PRICING_SNAPSHOT_MAX_ERROR_RATE="0.02")
    res = cli("load-snapshot", str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["rows_read"] == 303
    assert report["rejected"] == {
        "MISSING_USER_ID": 1,
        "BAD_FOLLOWED_AT": 1,
        "NEGATIVE_PURCHASE_COUNT": 1,
    }
    # one fact field per good row (follow, plus purchases when i % 3 != 0)
    assert report["memberships_written"] == 300
    assert "snapshot_row_rejected" in res.stderr  # a sample is logged


def test_too_many_malformed_rows_stop_the_load(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    lines = [f"u{i},42,2025-06-01T00:00:00Z,0" for i in range(2000)]
    for i in range(100, 2000, 50):
        lines[i] = f"u{i},42,not-a-time,0"  # 38 bad rows = 1.9% > 1% default
    _csv(tmp_path, "p0.csv", lines)
    _write_manifest(tmp_path, snapshot_time=fresh, files=["p0.csv"], rows=2000)
    env = cli_env(redis_url, namespace, PRICING_SNAPSHOT_BATCH_ROWS="200")
    res = cli("load-snapshot", str(tmp_path), env=env)
    assert res.returncode == 1
    assert "PRICING_SNAPSHOT_MAX_ERROR_RATE" in res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["status"] == "error_rate_exceeded"
    assert report["rows_read"] < 2000  # stopped early, once the budget of 20 was exceeded
    assert report["rejected"]["BAD_FOLLOWED_AT"] > 20


# --- crashes -------------------------------------------------------------------------------------
def _rows_done(client: redis.Redis, namespace: str) -> int:
    total = 0
    for key in client.scan_iter(match=f"{namespace}sync:snapshot:*"):
        for value in client.hgetall(key).values():
            total += int(json.loads(value)["offset"])
    return total


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted_load(
    redis_url: str, namespace: str, tmp_path: Path, cut: int
) -> None:
    """kill -9 at random points of progress (read from the loader's own checkpoints, so the
    test does not depend on how fast the loader is), resume, and end equal to the model."""
    rows = list(realistic_rows(100_000, cut, seed=11, sellers=2000))
    write_snapshot(tmp_path, rows, cut, part_rows=20_000)
    env = cli_env(redis_url, namespace, PRICING_SNAPSHOT_BATCH_ROWS="400")
    rng = random.Random(5)
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    kills = 0
    try:
        for attempt in range(30):
            done = _rows_done(client, namespace)
            # the first three runs die at a random point of the remaining load, then one finishes
            target = (
                done + rng.randint(400, max(401, (len(rows) - done) // 2)) if attempt < 3 else None
            )
            proc = popen("load-snapshot", str(tmp_path), "--no-progress", env=env)
            try:
                deadline = time.monotonic() + 60
                while proc.poll() is None and time.monotonic() < deadline:
                    if target is not None and _rows_done(client, namespace) >= target:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(10)
                        kills += 1
                        break
                    time.sleep(0.001)
                if proc.returncode == -signal.SIGKILL:
                    continue
                proc.wait(60)
            finally:
                assert proc.stdout is not None and proc.stderr is not None
                out = proc.stdout.read()
                proc.stdout.close()
                proc.stderr.close()
            assert proc.returncode == 0, out
            break
        else:
            pytest.fail("the load never finished")
    finally:
        client.close()
    assert kills >= 1, "the loader finished each run before reaching its kill point"
    s = make_settings(redis_url, namespace)
    assert redis_state(redis_url, namespace, now_ms()) == model_of(rows, cut, s).live(now_ms())
    res = cli("load-snapshot", str(tmp_path), env=env)
    assert json.loads(res.stdout.strip().splitlines()[-1])["status"] == "already_loaded"


# --- parallel parts ------------------------------------------------------------------------------
def test_parts_loaded_by_concurrent_processes(
    redis_url: str, namespace: str, tmp_path: Path, cut: int
) -> None:
    rows = list(realistic_rows(12_000, cut, seed=12, sellers=500))
    write_snapshot(tmp_path, rows, cut, part_rows=2000)
    env = cli_env(redis_url, namespace, PRICING_SNAPSHOT_BATCH_ROWS="500")
    procs = [
        popen("load-snapshot", str(tmp_path), "--worker-index", str(i), "--workers", "3", env=env)
        for i in range(3)
    ]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    loaded = sorted(p for r in reports for p in r["parts"])
    assert loaded == [f"part-{i:05d}.csv" for i in range(6)]
    assert sum(r["rows_read"] for r in reports) == len(rows)
    s = make_settings(redis_url, namespace)
    assert redis_state(redis_url, namespace, now_ms()) == model_of(rows, cut, s).live(now_ms())
    # the whole snapshot is now checkpointed as loaded, whoever loaded which part
    res = cli("load-snapshot", str(tmp_path), env=env)
    assert json.loads(res.stdout.strip().splitlines()[-1])["status"] == "already_loaded"


def test_jobs_option_splits_parts_between_processes(
    redis_url: str, namespace: str, tmp_path: Path, cut: int
) -> None:
    rows = list(realistic_rows(6000, cut, seed=13, sellers=500))
    write_snapshot(tmp_path, rows, cut, part_rows=1500)
    res = cli("load-snapshot", str(tmp_path), "--jobs", "2", env=cli_env(redis_url, namespace))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert (report["jobs"], report["rows_read"], report["status"]) == (2, len(rows), "loaded")
    s = make_settings(redis_url, namespace)
    assert redis_state(redis_url, namespace, now_ms()) == model_of(rows, cut, s).live(now_ms())


# --- the snapshot/event race ---------------------------------------------------------------------
async def test_unfollow_after_the_cut_survives_a_later_snapshot_load(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path, cut: int
) -> None:
    """The event stream applied an unfollow at cut+1; the snapshot (cut) still lists the
    relation and is loaded afterwards: the unfollow must win. A follow after the cut of a
    relation missing from the snapshot must survive too (snapshots never delete)."""
    s = make_settings(redis_url, namespace)
    store = MembershipStore(aredis, MembershipLayout(namespace), SystemClock())
    await store.apply(unfollow("gone", "42", cut + 1, ttls(s)))
    from pricing_service.membership.derive import follow  # noqa: PLC0415

    await store.apply(follow("new", "42", cut + 2, ttls(s)))
    rows = [
        SnapshotRow("gone", "42", cut - 60 * DAY_MS, 3),
        SnapshotRow("kept", "42", cut - DAY_MS, 0),
    ]
    write_snapshot(tmp_path, rows, cut)
    report = await load(s, tmp_path)
    # "gone": the follow part is stale (the unfollow is newer); its purchases are recorded
    assert (report["memberships_written"], report["skipped_stale"]) == (2, 0)
    crowds = [Crowd("42", k) for k in BUILTIN]
    assert await store.member_crowds("gone", crowds) == frozenset()
    assert await store.member_crowds("kept", crowds) == {Crowd("42", CrowdKind.ALL_FANS)}
    assert await store.member_crowds("new", crowds) == {Crowd("42", CrowdKind.ALL_FANS)}
    facts = await store.facts("gone", ["42"])
    gone = facts["42"]
    assert gone is not None and gone.follow is not None and gone.follow.tombstone
    assert gone.purchases is not None and gone.purchases.count == 3


async def test_snapshot_then_newer_unfollow_event_removes_membership(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path, cut: int
) -> None:
    """The other order: snapshot first, then the consumer applies the unfollow (via the stream
    format, decoded as the consumer does)."""
    from sync_worker.consumer import StreamConsumer  # noqa: PLC0415

    s = make_settings(
        redis_url,
        namespace,
        events_stream=f"{namespace}events",
        dead_letter_stream=f"{namespace}dead",
        stream_block_ms=100,
    )
    write_snapshot(tmp_path, [SnapshotRow("u", "42", cut - 60 * DAY_MS, 1)], cut)
    await load(s, tmp_path)
    await EventPublisher(aredis, s.events_stream).publish(
        [make_event("unfollow", "u", "42", cut + 1)]
    )
    async with StreamConsumer(s) as consumer:
        import asyncio  # noqa: PLC0415

        task = asyncio.create_task(consumer.run())
        for _ in range(100):
            if consumer.stats.events_applied:
                break
            await asyncio.sleep(0.05)
        consumer.shutdown()
        await asyncio.wait_for(task, 10)
    store = MembershipStore(aredis, MembershipLayout(namespace), SystemClock())
    assert await store.member_crowds("u", [Crowd("42", k) for k in BUILTIN]) == frozenset()


async def test_a_buyer_key_of_the_wrong_type_fails_the_load_but_not_the_others(
    redis_url: str, namespace: str, aredis: aioredis.Redis, tmp_path: Path, cut: int
) -> None:
    s = make_settings(redis_url, namespace)
    await aredis.set(MembershipLayout(namespace).user_key("broken"), "x")
    rows = [SnapshotRow("broken", "1", cut - DAY_MS, 0), SnapshotRow("fine", "1", cut - DAY_MS, 0)]
    write_snapshot(tmp_path, rows, cut)
    report = await load(s, tmp_path)
    assert report["status"] == "write_failures"
    assert report["failed_users"] == 1
    state = redis_state(redis_url, namespace, now_ms())
    assert set(state) == {("fine", "1")}


@pytest.mark.fault
async def test_redis_restarted_during_a_load_then_the_load_completes(
    tmp_path: Path, cut: int
) -> None:
    """A private redis-server (AOF on) is stopped mid-load and started again: the loader retries
    the batch in hand with backoff and finishes; the result equals the model."""
    from pricing_testing.redis_server import RedisServer, free_port  # noqa: PLC0415

    server = RedisServer(free_port(), extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    try:
        server.start()
    except RuntimeError as exc:
        from tests.conftest import service_missing  # noqa: PLC0415

        service_missing("redis-server binary", exc)
        return
    try:
        import asyncio  # noqa: PLC0415

        s = make_settings(server.url, "out:")
        rows = list(realistic_rows(80_000, cut, seed=21, sellers=1000))  # > 1 s of loading
        write_snapshot(tmp_path, rows, cut, part_rows=20_000)
        client = aioredis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        loader = SnapshotLoader(s, client, batch_rows=300)
        task = asyncio.create_task(loader.load(tmp_path))
        await asyncio.sleep(0.3)
        assert not task.done(), "the load finished before the outage; make it bigger"
        server.stop()
        await asyncio.sleep(1.0)
        server.start()
        report = await asyncio.wait_for(task, 60)
        await client.aclose()
        assert report.status == "loaded"
        assert report.rows_read == len(rows)
        assert redis_state(server.url, "out:", now_ms()) == model_of(rows, cut, s).live(now_ms())
    finally:
        server.close()


# --- counting a part's rows ---------------------------------------------------------------


def _parsed_count(path: Path) -> int | str:
    """The reference: every CSV record but blank lines, as a full parse counts them (or the
    error it raises)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return sum(1 for _ in _csv_rows(f, path)[0])
    except Exception as exc:  # compared by type
        return type(exc).__name__


_PIECES = st.sampled_from(
    [b"u1", b"42", b",", b"2025-01-01T00:00:00Z", b"0", b" ", b"\n", b"\n", b"\n", b"\r\n",
     b"\r", b'"', b'"a\nb"', b"\x00", "é".encode(), b"\xff", b"\xc3", b"\n\n"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(body=st.lists(_PIECES, max_size=30), chunk=st.sampled_from([3, 7, 1 << 20]))
def test_counting_rows_equals_parsing_them(
    body: list[bytes], chunk: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The byte-counting fast path agrees with the CSV parse on any file: counts, or falls
    back so that the same error is raised. Small chunks put every pattern across a boundary."""
    path = tmp_path_factory.mktemp("count") / "part.csv"
    path.write_bytes(HEADER.encode() + b"\n" + b"".join(body))
    expected = _parsed_count(path)
    try:
        with mock.patch.object(snapshot_module, "_CHUNK", chunk):
            got: int | str = count_rows(path)
    except Exception as exc:
        got = type(exc).__name__
    assert got == expected


def test_a_plain_part_is_counted_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "part.csv"
    path.write_text(
        HEADER + "\n" + "".join(f"u{i},42,2025-01-01T00:00:00Z,{i % 3}\n" for i in range(1000))
    )
    assert snapshot_module._count_plain_csv(path) == 1000 == count_rows(path)
    path.write_text(HEADER + "\n" + 'u1,"42",2025-01-01T00:00:00Z,0\n')
    assert snapshot_module._count_plain_csv(path) is None and count_rows(path) == 1


def test_malformed_parquet_rows_are_skipped_and_counted(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Parquet rows take the fast path only when typed and valid; every other row is judged
    by the full rules, exactly as in CSV."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    now = now_ms()
    cut = now - 3_600_000
    good = [(f"u{i}", "42", cut - 40 * DAY_MS, i % 3) for i in range(300)]
    bad = [
        (None, "42", cut - DAY_MS, 1),  # MISSING_USER_ID
        ("u9", "", cut - DAY_MS, 1),  # MISSING_SELLER_ID
        ("u9", "42", None, 1),  # BAD_FOLLOWED_AT
        ("u9", "42", cut + 3_600_000, 1),  # FOLLOWED_AFTER_CUT
        ("u9", "42", cut - DAY_MS, -2),  # NEGATIVE_PURCHASE_COUNT
        ("u9", "42", cut - DAY_MS, None),  # BAD_PURCHASE_COUNT
    ]
    rows = good[:150] + bad + good[150:]
    table = pa.table(
        {
            "user_id": pa.array([r[0] for r in rows], pa.string()),
            "seller_id": pa.array([r[1] for r in rows], pa.string()),
            "followed_at": pa.array([r[2] for r in rows], pa.timestamp("ms", tz="UTC")),
            "purchase_count": pa.array([r[3] for r in rows], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "p0.parquet")
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cut / 1000))
    _write_manifest(tmp_path, snapshot_time=fresh, files=["p0.parquet"], rows=len(rows))
    env = cli_env(redis_url, namespace, PRICING_SNAPSHOT_MAX_ERROR_RATE="0.05")
    res = cli("load-snapshot", str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["rows_read"] == len(rows)
    assert report["rejected"] == {
        "MISSING_USER_ID": 1,
        "MISSING_SELLER_ID": 1,
        "BAD_FOLLOWED_AT": 1,
        "FOLLOWED_AFTER_CUT": 1,
        "NEGATIVE_PURCHASE_COUNT": 1,
        "BAD_PURCHASE_COUNT": 1,
    }
    # one fact field per good row (follow, plus purchases when i % 3 != 0)
    assert report["memberships_written"] == 300
