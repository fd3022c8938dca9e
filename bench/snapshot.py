"""Snapshot load throughput vs ``redis-cli --pipe`` on the same private Redis.

    python -m bench.snapshot [--rows 1000000] [--jobs 1,2] [--batch-rows 10000] [--rounds 3]

Generates a realistic snapshot (most buyers follow a few sellers, about 1% follow hundreds),
loads it with the sync worker's loader (1 process, then N processes over disjoint parts), then
loads the same facts from pre-generated raw commands (per row: one ``HSET`` of the row's fact
field + one ``PEXPIREAT``, same keys and encoded values) with ``redis-cli --pipe``. A
"membership" below is one field written: since issue 14 one fact field per row (before it, one
record per crowd, ~2.3 per row): compare rows/s across versions.
Each run starts from an empty private redis-server (default configuration). The loader's time
includes its validation pass (row counting) and checkpoints; the pipe's time excludes command
generation. The loader and the pipe are measured back to back in each of ``--rounds`` rounds
(the shared host's speed drifts between minutes, so a ratio only compares runs of one round);
the last line, one JSON object, reports the median round (by ratio) and every round's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.harness import max_rss_kb, redis_cpu_seconds
from pricing_service.config import Settings, load_settings
from pricing_service.logging import configure_logging
from pricing_service.membership.derive import Ttls, encode_write, snapshot_row
from pricing_service.membership.layout import MembershipLayout
from pricing_service.redis_client import make_redis
from pricing_service.redis_pipe import encode_command
from pricing_testing.redis_server import RedisServer
from sync_worker.common import parse_rfc3339_ms
from sync_worker.parallel import load_parallel
from sync_worker.snapshot import SnapshotLoader
from sync_worker.snapshot_gen import realistic_rows, write_snapshot

NS = "bench:"


def make_pipe_file(snapshot: Path, path: Path, settings: Settings) -> int:
    """Raw HSET + PEXPIREAT commands for the snapshot's rows; returns the field count."""
    import csv  # noqa: PLC0415

    manifest = json.loads((snapshot / "manifest.json").read_text())
    cut = parse_rfc3339_ms(manifest["snapshot_time"])
    ttls = Ttls.from_seconds(
        settings.membership_ttl_s, settings.tombstone_ttl_s, settings.old_fan_min_days
    )
    layout = MembershipLayout(NS)
    n = 0
    with path.open("wb") as out:
        for part in manifest["files"]:
            with (snapshot / part).open(newline="") as f:
                reader = csv.reader(f)
                next(reader)
                buf: list[bytes] = []
                for user, seller, followed, count in reader:
                    [w] = snapshot_row(
                        user, seller, parse_rfc3339_ms(followed), int(count), cut, ttls
                    )
                    field, value = encode_write(w)
                    key = layout.user_key(user)
                    buf.append(encode_command(("HSET", key, field, value)))
                    expires = -(-(cut + ttls.membership_ms) // 1000) * 1000
                    buf.append(encode_command(("PEXPIREAT", key, str(expires))))
                    n += 1
                    if len(buf) > 20_000:
                        out.write(b"".join(buf))
                        buf.clear()
                out.write(b"".join(buf))
    return n


def count_fields(url: str) -> tuple[int, int]:
    """(keys, hash fields) of the bench namespace."""
    c = redis.Redis.from_url(url)
    keys = list(c.scan_iter(match=f"{NS}cm:*", count=5000))
    fields = 0
    for i in range(0, len(keys), 5000):
        pipe = c.pipeline(transaction=False)
        for k in keys[i : i + 5000]:
            pipe.hlen(k)
        fields += sum(pipe.execute())
    c.close()
    return len(keys), fields


def redis_cpu_s(url: str) -> float:
    c = redis.Redis.from_url(url)
    info = c.info("cpu")
    c.close()
    return redis_cpu_seconds(info)


def flush(url: str) -> None:
    c = redis.Redis.from_url(url)
    c.flushall()  # the benchmark's own private redis-server, never the shared one
    c.close()


async def load_one(settings: Settings, snapshot: Path, batch_rows: int) -> dict[str, Any]:
    client = make_redis(settings, socket_timeout_ms=60_000)
    try:
        report = await SnapshotLoader(settings, client, batch_rows=batch_rows).load(snapshot)
    finally:
        await client.aclose()
    return report.as_dict()


def measure_loader(
    settings: Any, server: RedisServer, snap: Path, jobs: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One load of the whole snapshot into an empty Redis with ``jobs`` processes."""
    flush(server.url)
    rcpu0, pcpu0 = redis_cpu_s(server.url), time.process_time()
    if jobs == 1:
        report = asyncio.run(load_one(settings, snap, args.batch_rows))
        report["python_cpu_us_per_membership"] = round(
            (time.process_time() - pcpu0) / report["memberships_written"] * 1e6, 2
        )
        report["python_cpu_us_per_row"] = round(
            (time.process_time() - pcpu0) / report["rows_read"] * 1e6, 2
        )
    else:
        reports = load_parallel(settings, snap, jobs, batch_rows=args.batch_rows)
        dur = max(r["duration_s"] for r in reports)
        written = sum(r["memberships_written"] for r in reports)
        report = {
            "duration_s": dur,
            "memberships_written": written,
            "rows_read": sum(r["rows_read"] for r in reports),
            "memberships_per_s": round(written / dur),
            "rows_per_s": round(sum(r["rows_read"] for r in reports) / dur),
        }
    rcpu = redis_cpu_s(server.url) - rcpu0
    report["redis_cpu_us_per_membership"] = round(rcpu / report["memberships_written"] * 1e6, 2)
    report["redis_cpu_us_per_row"] = round(rcpu / report["rows_read"] * 1e6, 2)
    keys, fields = count_fields(server.url)
    report["keys"], report["fields"] = keys, fields
    print(
        f"loader, {jobs} process(es): {report['memberships_written']:,} memberships "
        f"({report['rows_read']:,} rows) in {report['duration_s']:.2f}s = "
        f"{report['memberships_per_s']:,}/s; {keys:,} keys, {fields:,} fields; CPU per "
        f"membership: python {report.get('python_cpu_us_per_membership', '-')} us, "
        f"redis {report['redis_cpu_us_per_membership']} us",
        flush=True,
    )
    return report


def measure_pipe(server: RedisServer, pipe_file: Path, memberships: int) -> dict[str, Any]:
    """The same memberships as raw commands through ``redis-cli --pipe``, into an empty Redis."""
    flush(server.url)
    rcpu0 = redis_cpu_s(server.url)
    cli = shutil.which("redis-cli")
    if cli is None:
        raise SystemExit("redis-cli not found")
    t = time.perf_counter()
    with pipe_file.open("rb") as f:
        subprocess.run(
            [cli, "-p", str(server.port), "--pipe"], stdin=f, check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    pipe_s = time.perf_counter() - t
    redis_cpu_us = (redis_cpu_s(server.url) - rcpu0) / memberships * 1e6
    pkeys, pfields = count_fields(server.url)
    rate = round(memberships / pipe_s)
    print(
        f"redis-cli --pipe: {memberships:,} memberships in {pipe_s:.2f}s = {rate:,}/s; "
        f"{pkeys:,} keys, {pfields:,} fields; redis CPU per membership {redis_cpu_us:.2f} us",
        flush=True,
    )
    return {"rate": rate, "redis_cpu_us": redis_cpu_us, "keys_fields": (pkeys, pfields)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--part-rows", type=int, default=125_000)
    ap.add_argument("--batch-rows", type=int, default=10_000)
    ap.add_argument("--jobs", default="1,2", help="process counts to measure")
    ap.add_argument(
        "--rounds", type=int, default=3, help="loader + pipe rounds; the median round is reported"
    )
    args = ap.parse_args()
    configure_logging("WARNING", "console")
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    server = RedisServer().start()
    try:
        settings = load_settings(redis_url=server.url, redis_namespace=NS, log_level="WARNING")
        cut = time.time_ns() // 1_000_000 - 3_600_000
        t = time.perf_counter()
        snap = work / "snapshot"
        write_snapshot(snap, realistic_rows(args.rows, cut), cut, part_rows=args.part_rows)
        gen_s = time.perf_counter() - t
        size_mb = sum(f.stat().st_size for f in snap.iterdir()) / 1e6
        print(f"generated {args.rows:,} rows ({size_mb:.0f} MB CSV) in {gen_s:.1f}s")

        pipe_file = work / "commands.resp"
        memberships = make_pipe_file(snap, pipe_file, settings)
        jobs_list = [int(j) for j in args.jobs.split(",")]
        rounds: list[dict[str, Any]] = []
        for round_no in range(1, args.rounds + 1):
            # each round: the loader with every process count, then the pipe, back to back (the
            # host's speed drifts over minutes: a ratio compares runs of the same round)
            results = {
                jobs: measure_loader(settings, server, snap, jobs, args) for jobs in jobs_list
            }
            pipe = measure_pipe(server, pipe_file, memberships)
            best_jobs = max(results, key=lambda j: results[j]["memberships_per_s"])
            best = results[best_jobs]["memberships_per_s"]
            same = all((r["keys"], r["fields"]) == pipe["keys_fields"] for r in results.values())
            rounds.append(
                {
                    "results": results,
                    "pipe": pipe,
                    "best_jobs": best_jobs,
                    "best": best,
                    "ratio": best / pipe["rate"],
                    "same": same,
                }
            )
            print(
                f"round {round_no}: best {best:,}/s ({best_jobs} processes), pipe "
                f"{pipe['rate']:,}/s, ratio {best / pipe['rate']:.3f}, same keys and fields: {same}",
                flush=True,
            )
        max_rss_mb = max_rss_kb() / 1024
        mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]  # the median round
        results = mid["results"]
        best_jobs = mid["best_jobs"]
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "memberships": memberships,
                    "rounds": len(rounds),
                    "memberships_per_s": mid["best"],
                    "rows_per_s": mid["results"][best_jobs]["rows_per_s"],
                    "rows_per_s_per_round": [
                        r["results"][r["best_jobs"]]["rows_per_s"] for r in rounds
                    ],
                    "best_jobs": best_jobs,
                    **{
                        f"memberships_per_s_{j}proc": r["memberships_per_s"]
                        for j, r in results.items()
                    },
                    "redis_pipe_memberships_per_s": mid["pipe"]["rate"],
                    "ratio": round(mid["ratio"], 3),
                    "ratio_per_round": [round(r["ratio"], 3) for r in rounds],
                    "memberships_per_s_per_round": [r["best"] for r in rounds],
                    "same_result_as_pipe": all(r["same"] for r in rounds),
                    "python_cpu_us_per_membership_1proc": results.get(1, {}).get(
                        "python_cpu_us_per_membership"
                    ),
                    "python_cpu_us_per_row_1proc": results.get(1, {}).get("python_cpu_us_per_row"),
                    "redis_cpu_us_per_row_loader": results[best_jobs]["redis_cpu_us_per_row"],
                    "redis_cpu_us_per_membership_loader": results[best_jobs][
                        "redis_cpu_us_per_membership"
                    ],
                    "redis_cpu_us_per_membership_pipe": round(mid["pipe"]["redis_cpu_us"], 2),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "batch_rows": args.batch_rows,
                    "parent_max_rss_mb": round(max_rss_mb),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                }
            )
        )
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
