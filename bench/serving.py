"""Serving benchmark: BatchGetLowestPrice of the real server against a no-op gRPC echo server.

One run, one harness, both servers:

1. A private ``redis-server`` and a SQLite rule store get realistic data: 100 sellers x 20 items,
   3 crowd rules per item (some ended or not yet started), 2,000 buyers with memberships, and
   the benchmark buyer, who follows 6 of the 10 sellers of the page (3 as an old fan, 2 as a
   purchaser). The page is ``--batch`` items spread over 10 sellers.
2. ``python -m pricing_service serve --workers N`` starts on that data. One real gRPC call is
   checked item by item against the pure engine's answer (some items discounted, not
   degraded) before any load is applied.
3. ``h2load`` (nghttp2's C load generator) posts the length-prefixed protobuf request: first
   closed loop (``--clients`` connections x ``--streams`` streams) for the peak rate, then open
   loop (``--rps`` per client) at fractions of that peak. p50/p99 come from h2load's per-request
   log. Server CPU time per request is read from ``/proc``.
4. After the load the server's Prometheus counters must show every RPC OK and no degraded
   answer, and its log one ``rpc_finished`` line per RPC: a fast wrong answer is no result.
5. The same steps against ``bench.echo_server`` (same process model, same gRPC options, a
   pre-built copy of the real answer), then a latency-vs-throughput plot of both.

With ``--workers 1`` (and ``--pin auto``) the server gets CPU 1, h2load and Redis CPU 0.

    python -m bench.serving --workers 1 --batch 20 --duration 10 --plot docs/benchmarks/serving.png

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support.redis_server import RedisServer, free_port

NAMESPACE = "bench:"
SELLERS = 100
ITEMS_PER_SELLER = 20
PAGE_SELLERS = 10
OTHER_BUYERS = 2000
BUYER = "u-bench-0001"
CURRENCY = "CNY"
METHOD = "/pricing.v1.PricingService/BatchGetLowestPrice"
TICKS = os.sysconf("SC_CLK_TCK")


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Catalog:
    """What was written to the stores, enough to predict every answer."""

    sellers: list[str]
    items: dict[str, list[str]]  # seller -> item ids
    list_price: dict[str, int]  # item -> list price (minor units)
    page_sellers: list[str]


def catalog(seed: int = 42) -> Catalog:
    rnd = random.Random(seed)
    sellers = [str(1001 + s) for s in range(SELLERS)]
    items = {s: [f"{s}{j:04d}" for j in range(ITEMS_PER_SELLER)] for s in sellers}
    list_price = {i: rnd.randrange(2_000, 50_000, 100) for s in sellers for i in items[s]}
    return Catalog(sellers, items, list_price, rnd.sample(sellers, PAGE_SELLERS))


def page(cat: Catalog, batch: int) -> list[tuple[str, int]]:
    """``batch`` (item, list price) pairs, round-robin over the page's 10 sellers."""
    if batch > PAGE_SELLERS * ITEMS_PER_SELLER:
        raise SystemExit(f"--batch at most {PAGE_SELLERS * ITEMS_PER_SELLER}")
    out = []
    for k in range(batch):
        seller = cat.page_sellers[k % PAGE_SELLERS]
        item = cat.items[seller][k // PAGE_SELLERS]
        out.append((item, cat.list_price[item]))
    return out


async def load_data(settings: Any, cat: Catalog, seed: int = 7) -> None:
    """Rules into the store (SQLite), memberships into the private Redis."""
    from pricing_service.domain import CrowdKind, Money, Rule, SystemClock  # noqa: PLC0415
    from pricing_service.membership import derive  # noqa: PLC0415
    from pricing_service.membership.layout import MembershipLayout  # noqa: PLC0415
    from pricing_service.membership.store import MembershipStore  # noqa: PLC0415
    from pricing_service.redis_client import make_redis  # noqa: PLC0415
    from pricing_service.rules.store import open_rule_store  # noqa: PLC0415

    rnd = random.Random(seed)
    clock = SystemClock()
    now = clock.now_ms()
    day = derive.DAY_MS
    rules: list[Rule] = []
    for s in cat.sellers:
        for item in cat.items[s]:
            lp = cat.list_price[item]
            for kind, off in (
                (CrowdKind.ALL_FANS, 5),
                (CrowdKind.OLD_FANS, 10),
                (CrowdKind.PURCHASED_FANS, 15),
            ):
                start = end = None
                roll = rnd.random()
                if roll < 0.05:
                    end = now - day  # ended yesterday
                elif roll < 0.10:
                    start = now + day  # starts tomorrow
                elif roll < 0.30:
                    start, end = now - day, now + 30 * day
                pct = off + rnd.randrange(0, 10)
                if rnd.random() < 0.05:
                    pct = -5  # above the list price: never applied
                price = lp * (100 - pct) // 100
                rules.append(Rule("", s, item, kind, Money(CURRENCY, price), start, end))
    store = await open_rule_store(settings)
    try:
        for i in range(0, len(rules), 1000):
            await store.upsert_many(rules[i : i + 1000], "bench")
    finally:
        await store.close()

    redis = make_redis(settings)
    try:
        membership = MembershipStore(redis, MembershipLayout(settings.redis_namespace), clock)
        ttls = derive.Ttls.from_seconds(
            settings.membership_ttl_s, settings.tombstone_ttl_s, settings.old_fan_min_days
        )
        cut = now - 3_600_000
        writes: list[derive.MembershipWrite] = []
        for b in range(OTHER_BUYERS):
            for s in rnd.sample(cat.sellers, 15):
                followed = cut - rnd.randrange(1, 400) * day
                writes += derive.snapshot_row(
                    f"u{b:06d}", s, followed, rnd.choice((0, 0, 1, 3)), cut, ttls
                )
        # the benchmark buyer: 6 of the page's 10 sellers, plus 20 sellers off the page
        page_s = cat.page_sellers
        others = [s for s in cat.sellers if s not in page_s]
        for k, s in enumerate(page_s[:6]):
            followed = cut - (90 if k < 3 else 5) * day
            writes += derive.snapshot_row(BUYER, s, followed, 1 if k in (0, 4) else 0, cut, ttls)
        for s in rnd.sample(others, 20):
            writes += derive.snapshot_row(BUYER, s, cut - 200 * day, 1, cut, ttls)
        for i in range(0, len(writes), 5000):
            result = await membership.apply(writes[i : i + 5000])
            if result.failed_users:
                raise RuntimeError(f"membership writes failed: {result.failed_users}")
    finally:
        await redis.aclose()


async def expected_answer(
    settings: Any, items: list[tuple[str, int]]
) -> list[tuple[str, int, str]]:
    """(item, price, rule id or '') per item, from the stores and the pure engine."""
    from pricing_service.domain import Money, SystemClock  # noqa: PLC0415
    from pricing_service.engine import crowds_to_check, decide  # noqa: PLC0415
    from pricing_service.membership.layout import MembershipLayout  # noqa: PLC0415
    from pricing_service.membership.store import MembershipStore  # noqa: PLC0415
    from pricing_service.redis_client import make_redis  # noqa: PLC0415
    from pricing_service.rules.store import open_rule_store  # noqa: PLC0415

    clock = SystemClock()
    now = clock.now_ms()
    store = await open_rule_store(settings)
    try:
        rule_lists = [(await store.rules_for_item(item))[0] for item, _ in items]
    finally:
        await store.close()
    redis = make_redis(settings)
    try:
        membership = MembershipStore(redis, MembershipLayout(settings.redis_namespace), clock)
        members = await membership.member_crowds(BUYER, crowds_to_check(rule_lists, now))
    finally:
        await redis.aclose()
    out = []
    for (item, lp), rules in zip(items, rule_lists, strict=True):
        d = decide(Money(CURRENCY, lp), rules, members, now)
        assert d.price is not None
        out.append((item, d.price.amount_minor, d.rule.rule_id if d.rule else ""))
    return out


async def page_fields(settings: Any, items: list[tuple[str, int]]) -> tuple[str, list[str]]:
    """The buyer's hash and the fields the server's one HMGET reads for this page (the floor's
    read), as the membership store derives them."""
    from pricing_service.domain import SystemClock  # noqa: PLC0415
    from pricing_service.engine import crowd_keys_to_check  # noqa: PLC0415
    from pricing_service.membership.layout import MembershipLayout  # noqa: PLC0415
    from pricing_service.membership.store import MembershipStore  # noqa: PLC0415
    from pricing_service.redis_client import make_redis  # noqa: PLC0415
    from pricing_service.rules.store import open_rule_store  # noqa: PLC0415

    store = await open_rule_store(settings)
    try:
        rule_lists = [(await store.rules_for_item(item))[0] for item, _ in items]
    finally:
        await store.close()
    clock = SystemClock()
    redis = make_redis(settings)  # not connected: only the layout is used
    try:
        membership = MembershipStore(redis, MembershipLayout(settings.redis_namespace), clock)
        _, fields = membership.lookup_fields(crowd_keys_to_check(rule_lists, clock.now_ms()))
        return membership.layout.user_key(BUYER), [f.decode() for f in fields]
    finally:
        await redis.aclose()


def request_bytes(items: list[tuple[str, int]]) -> bytes:
    from pricing.v1 import common_pb2, pricing_pb2  # noqa: PLC0415

    req = pricing_pb2.BatchGetLowestPriceRequest(
        user_id=BUYER,
        items=[
            pricing_pb2.PriceQuery(
                item_id=i, list_price=common_pb2.Money(currency_code=CURRENCY, amount_minor=lp)
            )
            for i, lp in items
        ],
    )
    data: bytes = req.SerializeToString()
    return data


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def call_once(target: str, request: bytes, timeout_s: float = 20.0) -> bytes:
    """One real BatchGetLowestPrice (waits for the server to come up); the raw response."""
    import grpc  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(
            METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        while True:
            try:
                data: bytes = rpc(request, timeout=2, wait_for_ready=True)
                return data
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class DegradedAnswer(AssertionError):
    """The server answered list prices: it could not read membership in time."""


def check_answer(response: bytes, expected: list[tuple[str, int, str]]) -> int:
    """Raise unless the response equals the expected answer; return the discounted count."""
    from pricing.v1 import pricing_pb2  # noqa: PLC0415

    r = pricing_pb2.BatchGetLowestPriceResponse.FromString(response)
    if r.degraded:
        raise DegradedAnswer("the server answered degraded: membership was not read")
    got = [(p.item_id, p.price.amount_minor, p.rule_id) for p in r.prices]
    if got != expected:
        raise AssertionError(f"wrong answer:\n got {got}\nwant {expected}")
    discounted = sum(1 for p in r.prices if p.discounted)
    if not 0 < discounted < len(expected):
        raise AssertionError(f"{discounted} of {len(expected)} discounted: not a realistic page")
    return discounted


def verified_call(
    target: str, request: bytes, expected: list[tuple[str, int, str]], attempts: int = 10
) -> bytes:
    """A real call whose answer must be exactly ``expected``.

    A degraded answer (membership budget missed: a cold connection, a loaded machine) is retried
    a few times, as the server's breaker would; a wrong answer fails at once.
    """
    for attempt in range(attempts):
        response = call_once(target, request)
        try:
            check_answer(response, expected)
            return response
        except DegradedAnswer:
            if attempt == attempts - 1:
                raise
            time.sleep(0.3)
    raise AssertionError("unreachable")


# --- processes --------------------------------------------------------------------------------


def pinned(cpus: str | None, args: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *args] if cpus else args


class Server:
    """A child process (the pricing server or the echo server) and its process tree."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        # O_APPEND: the workers share this file; each line must land whole, never interleaved
        self._log = log.open("ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def pids(self) -> list[int]:
        out: list[int] = []
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return out

    def cpu_s(self) -> float:
        return cpu_seconds(self.pids())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._log.close()
        return code


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICKS


# --- load -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Point:
    """One load point."""

    server: str
    mode: str  # closed | open
    target_rps: float | None
    rps: float
    requests: int
    failed: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_us_per_req: float | None = None
    redis_cpu_us_per_req: float | None = None
    #: answers the server gave with list prices during this point (warm-up included)
    degraded: int | None = None


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of sorted values."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return float(sorted_values[k])


#: requests/s of one paced h2load connection: at most one request per 10 ms timer tick
PACED_CLIENT_RPS = 90
_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


@dataclass(slots=True)
class Harness:
    """h2load settings shared by every load point of both servers."""

    workdir: Path
    clients: int
    streams: int
    duration_s: float
    warmup_s: float
    h2load_cpus: str | None
    redis_pid: int | None = None
    runs: int = field(default=0)
    #: the server's counters (``scrape``), when it has any: degraded answers per point
    counters: Callable[[], dict[str, float]] | None = None

    def _h2load(
        self, body: Path, port: int, log: Path, clients: int, streams: int, rps: float | None
    ) -> list[str]:
        """One h2load command line (``rps`` per connection, None = closed loop)."""
        log.unlink(missing_ok=True)  # h2load appends
        args = [
            "h2load",
            "-c", str(clients),
            "-t", "1",
            "-m", str(streams),
            "-D", f"{self.duration_s:g}",
            "--warm-up-time", f"{self.warmup_s:g}",
            "-d", str(body),
            "-H", "content-type: application/grpc",
            "-H", "te: trailers",
            "--log-file", str(log),
        ]  # fmt: skip
        if rps is not None:
            args += ["--rps", f"{rps:.3f}"]
        args.append(f"http://127.0.0.1:{port}{METHOD}")
        return pinned(self.h2load_cpus, args)

    def _measure(
        self,
        server: Server,
        name: str,
        mode: str,
        rps_total: float | None,
        commands: Sequence[tuple[list[str], Path]],
        stagger_s: float = 0.0,
    ) -> Point:
        """Run the h2load ``commands`` (``stagger_s`` apart) against ``server``; one Point from
        all their outputs and per-request logs, with the server's CPU over the measured window."""
        before = self.counters() if self.counters else None
        procs = []
        for args, _ in commands:
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            if stagger_s:
                time.sleep(stagger_s)
        time.sleep(self.warmup_s + 0.2)  # connect + warm-up: not part of the CPU accounting
        cpu0 = server.cpu_s()
        rcpu0 = cpu_seconds([self.redis_pid]) if self.redis_pid else 0.0
        t0 = time.monotonic()
        outs = [proc.communicate(timeout=self.duration_s + self.warmup_s + 60)[0] for proc in procs]
        # the measured window ends at duration; the tail of communicate() is idle time
        elapsed = min(time.monotonic() - t0, self.duration_s - 0.2)
        cpu = server.cpu_s() - cpu0
        rcpu = (cpu_seconds([self.redis_pid]) - rcpu0) if self.redis_pid else 0.0
        rps = 0.0
        total = failed = 0
        durations: list[int] = []
        for proc, out, (_, log) in zip(procs, outs, commands, strict=True):
            text = out.decode(errors="replace")
            m_fin, m_req = _FINISHED.search(text), _REQUESTS.search(text)
            if proc.returncode != 0 or m_fin is None or m_req is None:
                raise RuntimeError(f"h2load failed ({proc.returncode}):\n{text}")
            rps += float(m_fin.group(2))
            total += int(m_req.group(1))
            failed += int(m_req.group(5)) + int(m_req.group(6)) + int(m_req.group(7))
            with log.open() as f:
                for line in f:
                    parts = line.split("\t")
                    if len(parts) < 3:
                        continue
                    if parts[1] != "200":
                        failed += 1
                        continue
                    durations.append(int(parts[2]))
            log.unlink(missing_ok=True)
        durations.sort()
        done_in_window = rps * elapsed
        degraded = None
        if self.counters and before is not None:
            degraded = int(self.counters()["degraded"] - before["degraded"])
        return Point(
            server=name,
            mode=mode,
            target_rps=rps_total,
            rps=rps,
            requests=total,
            failed=failed,
            p50_ms=percentile(durations, 50) / 1000,
            p90_ms=percentile(durations, 90) / 1000,
            p99_ms=percentile(durations, 99) / 1000,
            max_ms=(durations[-1] / 1000) if durations else float("nan"),
            server_cpu_us_per_req=cpu / done_in_window * 1e6 if done_in_window else None,
            redis_cpu_us_per_req=(rcpu / done_in_window * 1e6)
            if self.redis_pid and done_in_window
            else None,
            degraded=degraded,
        )

    def run(
        self, server: Server, name: str, port: int, body: Path, rps_total: float | None
    ) -> Point:
        """One load point from one h2load: closed loop (``rps_total`` None) or its rate mode."""
        self.runs += 1
        log = self.workdir / f"h2load-{self.runs}.tsv"
        streams = self.streams if rps_total is None else max(self.streams, 64)
        per = None if rps_total is None else rps_total / self.clients
        args = self._h2load(body, port, log, self.clients, streams, per)
        mode = "closed" if rps_total is None else "open"
        return self._measure(server, name, mode, rps_total, [(args, log)])

    def run_paced(
        self, server: Server, name: str, port: int, body: Path, rps_total: float
    ) -> Point:
        """Open loop without h2load's bursts: h2load's ``--rps`` timer fires at most every
        10 ms and sends what is due at once, and the clients of one h2load start together, so
        at a few hundred requests/s per client the arrivals come in bursts of ~10 every 10 ms.
        Here ``K`` h2load processes of one connection each run at <= 90 requests/s (one
        request per timer tick), started ``1 / rps_total`` s apart: K independent paced
        callers with spread phases, the same total rate."""
        k = max(1, math.ceil(rps_total / PACED_CLIENT_RPS))
        self.runs += 1
        commands = []
        for i in range(k):
            log = self.workdir / f"h2load-{self.runs}-{i}.tsv"
            commands.append((self._h2load(body, port, log, 1, 64, rps_total / k), log))
        return self._measure(
            server, name, f"paced{k}", rps_total, commands, stagger_s=1 / rps_total
        )

    def curve(
        self, server: Server, name: str, port: int, body: Path, fractions: Sequence[float]
    ) -> tuple[Point, dict[float, Point]]:
        peak = self.run(server, name, port, body, None)
        report(peak)
        points = {}
        for frac in fractions:
            p = self.run(server, name, port, body, peak.rps * frac)
            report(p)
            points[frac] = p
        return peak, points


def _round(server: Point, echo: Point | None, floor: Point | None) -> dict[str, float | None]:
    """One round's peak rates (requests/s) and their ratios to the echo's."""
    return {
        "rps": round(server.rps, 1),
        "echo_rps": round(echo.rps, 1) if echo else None,
        "floor_rps": round(floor.rps, 1) if floor else None,
        "ratio_to_echo": round(server.rps / echo.rps, 3) if echo else None,
        "floor_ratio_to_echo": round(floor.rps / echo.rps, 3) if floor and echo else None,
    }


def _median(values: Sequence[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else round((known[mid - 1] + known[mid]) / 2, 3)


def report(p: Point) -> None:
    target = f"{p.target_rps:8.0f}" if p.target_rps is not None else "  (peak)"
    cpu = f"{p.server_cpu_us_per_req:7.0f}" if p.server_cpu_us_per_req else "      -"
    print(
        f"  {p.server:6} {p.mode:6} target {target} rps {p.rps:8.1f}  p50 {p.p50_ms:7.2f} ms  "
        f"p90 {p.p90_ms:7.2f}  p99 {p.p99_ms:7.2f}  max {p.max_ms:7.2f}  "
        f"cpu/req {cpu} us  failed {p.failed}"
        + (f"  degraded {p.degraded}" if p.degraded is not None else ""),
        flush=True,
    )


# --- server checks ----------------------------------------------------------------------------


def scrape(ports: Sequence[int]) -> dict[str, float]:
    """Sum of the counters that matter over every worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    sums: dict[str, float] = {"ok": 0.0, "not_ok": 0.0, "degraded": 0.0}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "pricing_rpc_requests_total":
                    key = "ok" if s.labels.get("code") == "OK" else "not_ok"
                    sums[key] += s.value
                elif s.name == "pricing_degraded_answers_total":
                    sums["degraded"] += s.value
    return sums


def count_log_lines(path: Path, event: str) -> int:
    needle = f'"event": "{event}"'.encode()
    needle2 = f'"event":"{event}"'.encode()
    n = 0
    with path.open("rb") as f:
        for line in f:
            if needle in line or needle2 in line:
                n += 1
    return n


def free_port_block(n: int) -> int:
    """A base port such that base..base+n-1 are free now."""
    import socket  # noqa: PLC0415

    for _ in range(200):
        base = random.randrange(20_000, 60_000)
        try:
            socks = []
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


# --- plot -------------------------------------------------------------------------------------


def plot(path: Path, title: str, curves: dict[str, list[Point]]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"server": "tab:blue", "echo": "tab:gray"}
    for name, points in curves.items():
        pts = sorted(points, key=lambda p: p.rps)
        xs = [p.rps for p in pts]
        c = colors.get(name)
        ax.plot(xs, [p.p99_ms for p in pts], "o-", color=c, label=f"{name} p99")
        ax.plot(xs, [p.p50_ms for p in pts], "s--", color=c, alpha=0.6, label=f"{name} p50")
    ax.axhline(5.0, color="tab:red", lw=0.8, ls=":", label="p99 target 5 ms")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    p.add_argument("--workers", type=int, default=1, help="server (and echo) processes")
    p.add_argument("--batch", type=int, default=20, help="items per request")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    p.add_argument("--warmup", type=float, default=1.0, help="h2load warm-up seconds per point")
    p.add_argument("--clients", type=int, default=4, help="h2load connections")
    p.add_argument("--streams", type=int, default=4, help="streams per connection (closed loop)")
    p.add_argument(
        "--fractions",
        default="0.25,0.5,0.7,0.9",
        help="open-loop rates as fractions of the peak (0.7 is always measured)",
    )
    p.add_argument(
        "--paced",
        action="store_true",
        help="also measure the 70 %% point with paced callers (no h2load rate bursts)",
    )
    p.add_argument(
        "--scaling-batch",
        type=int,
        default=100,
        help="also measure the server's peak at this batch size (0 = skip)",
    )
    p.add_argument(
        "--membership-budget-ms",
        type=int,
        default=None,
        help="PRICING_MEMBERSHIP_BUDGET_MS of the server (default: the server's own, 50 ms); "
        "on a host starved by other work, event-loop lag blows the budget and answers degrade",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="peak rounds: after the full run, N-1 more rounds of the server's, the echo's "
        "(and the floor's) peak, back to back; the medians of the ratios are reported",
    )
    p.add_argument("--pin", choices=["auto", "off"], default="auto")
    p.add_argument("--no-echo", action="store_true", help="skip the echo baseline")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure the floor: the echo plus the page's HMGET and the canonical log line",
    )
    p.add_argument("--plot", default="docs/benchmarks/serving.png", help="PNG path ('' = none)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    fractions = sorted({*(float(x) for x in args.fractions.split(",") if x), 0.7})
    ncpu = os.cpu_count() or 1
    pin = args.pin == "auto" and args.workers == 1 and ncpu >= 2
    server_cpus = "1" if pin else None
    client_cpus = "0" if pin else None
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    result: dict[str, Any] = {}
    redis = RedisServer()
    redis.start()
    try:
        if pin and redis.proc is not None:
            subprocess.run(["taskset", "-a", "-pc", "0", str(redis.proc.pid)], check=True,
                           capture_output=True)  # fmt: skip
        result = run(args, fractions, workdir, redis, server_cpus, client_cpus)
    finally:
        redis.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}")
    print(json.dumps(result, sort_keys=True))


def run(
    args: argparse.Namespace,
    fractions: list[float],
    workdir: Path,
    redis: RedisServer,
    server_cpus: str | None,
    client_cpus: str | None,
) -> dict[str, Any]:
    from pricing_service.config import load_settings  # noqa: PLC0415

    port = free_port()
    metrics_base = free_port_block(args.workers)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
    env.update(
        {
            "PRICING_REDIS_URL": redis.url,
            "PRICING_REDIS_NAMESPACE": NAMESPACE,
            "PRICING_RULE_STORE_URL": f"sqlite:///{workdir / 'rules.db'}",
            "PRICING_LISTEN": f"127.0.0.1:{port}",
            "PRICING_METRICS_PORT": str(metrics_base),
            "PRICING_LOG_FORMAT": "json",
            "PRICING_LOG_LEVEL": "INFO",
        }
    )
    if args.membership_budget_ms is not None:
        env["PRICING_MEMBERSHIP_BUDGET_MS"] = str(args.membership_budget_ms)
    settings = load_settings(
        redis_url=redis.url,
        redis_namespace=NAMESPACE,
        rule_store_url=f"sqlite:///{workdir / 'rules.db'}",
    )
    load_start = os.getloadavg()[0]  # other work on the host skews every figure: say how much
    cat = catalog()
    t0 = time.monotonic()
    asyncio.run(load_data(settings, cat))
    print(f"data loaded in {time.monotonic() - t0:.1f} s: {SELLERS * ITEMS_PER_SELLER * 3} rules, "
          f"{OTHER_BUYERS + 1} buyers", flush=True)  # fmt: skip
    batches = [args.batch] + ([args.scaling_batch] if args.scaling_batch else [])
    bodies: dict[int, Path] = {}
    expected: dict[int, list[tuple[str, int, str]]] = {}
    requests: dict[int, bytes] = {}
    for b in batches:
        items = page(cat, b)
        requests[b] = request_bytes(items)
        bodies[b] = workdir / f"request-{b}.bin"
        bodies[b].write_bytes(grpc_frame(requests[b]))
        expected[b] = asyncio.run(expected_answer(settings, items))

    harness = Harness(
        workdir, args.clients, args.streams, args.duration, args.warmup, client_cpus,
        redis.proc.pid if redis.proc else None,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    metrics_ports = [metrics_base + i for i in range(args.workers)]
    harness.counters = lambda: scrape(metrics_ports)
    print(
        f"server: --workers {args.workers}, batch {args.batch}, h2load -c {args.clients} "
        f"-m {args.streams} -D {args.duration:g}s, pinned: {server_cpus is not None}",
        flush=True,
    )

    def start_server(log: Path) -> Server:
        return Server(
            pinned(server_cpus, [sys.executable, "-m", "pricing_service", "serve",
                                 "--workers", str(args.workers)]),
            env,
            log,
        )  # fmt: skip

    server_log = workdir / "server.log"
    server = start_server(server_log)
    try:
        responses = {b: verified_call(target, requests[b], expected[b]) for b in batches}
        discounted = check_answer(responses[args.batch], expected[args.batch])
        print(f"  verified: {discounted} of {args.batch} items discounted, not degraded")
        before = scrape(metrics_ports)
        log_before = count_log_lines(server_log, "rpc_finished")
        peak, points = harness.curve(server, "server", port, bodies[args.batch], fractions)
        paced: Point | None = None
        if args.paced:
            paced = harness.run_paced(server, "server", port, bodies[args.batch], peak.rps * 0.7)
            report(paced)
        scaling: Point | None = None
        if args.scaling_batch:
            scaling = harness.run(server, "server", port, bodies[args.scaling_batch], None)
            print(f"  batch {args.scaling_batch}:", end="")
            report(scaling)
        # correctness after load: still the right answer, every RPC OK, nothing degraded
        verified_call(target, requests[args.batch], expected[args.batch])
        after = scrape(metrics_ports)
        log_after = count_log_lines(server_log, "rpc_finished")
    finally:
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"server exited {code}:\n{server_log.read_text()[-4000:]}")
    rpcs = after["ok"] - before["ok"]
    all_points = [
        peak,
        *points.values(),
        *([scaling] if scaling else []),
        *([paced] if paced else []),
    ]
    sent = sum(p.requests for p in all_points)
    checks = {
        "not_ok_rpcs": after["not_ok"] - before["not_ok"],
        "degraded_answers": after["degraded"] - before["degraded"],
        "ok_rpcs": rpcs,
        "h2load_requests": sent,
        "h2load_failed": sum(p.failed for p in all_points),
        "rpc_log_lines": log_after - log_before,
    }
    print(f"  server checks: {checks}")
    problems = []
    if checks["not_ok_rpcs"] or checks["degraded_answers"] or checks["h2load_failed"]:
        problems.append("errors or degraded answers under load")
    if rpcs < sent:  # h2load counts only the measured window; the server also saw warm-up
        problems.append(f"server counted {rpcs:.0f} OK RPCs, h2load {sent}")
    if checks["rpc_log_lines"] != rpcs:
        problems.append("not one rpc_finished log line per RPC")

    echo_peak: Point | None = None
    echo_paced: Point | None = None
    echo_points: dict[float, Point] = {}
    resp_file = workdir / "response.bin"
    resp_file.write_bytes(responses[args.batch])

    def start_echo(name: str, extra: list[str]) -> tuple[Server, int]:
        """``bench.echo_server`` (the echo, or with ``extra`` the floor) answering the page."""
        echo_port = free_port()
        echo = Server(
            pinned(server_cpus, [sys.executable, "-m", "bench.echo_server",
                                 "--listen", f"127.0.0.1:{echo_port}",
                                 "--workers", str(args.workers), "--response", str(resp_file),
                                 *extra]),
            env,
            workdir / f"{name}.log",
        )  # fmt: skip
        try:
            answer = call_once(f"127.0.0.1:{echo_port}", requests[args.batch])
        except BaseException:
            echo.stop()
            raise
        if answer != responses[args.batch]:
            problems.append(f"{name} answer differs from the server's")
        return echo, echo_port

    if not args.no_echo:
        print("echo baseline (same harness, same response bytes)", flush=True)
        echo, echo_port = start_echo("echo", [])
        try:
            harness.redis_pid = None
            harness.counters = None
            echo_peak, echo_points = harness.curve(
                echo, "echo", echo_port, bodies[args.batch], fractions
            )
            if args.paced:
                echo_paced = harness.run_paced(
                    echo, "echo", echo_port, bodies[args.batch], echo_peak.rps * 0.7
                )
                report(echo_paced)
        finally:
            echo.stop()

    floor_peak: Point | None = None
    floor_args: list[str] = []
    if args.floor:
        key, fields = asyncio.run(page_fields(settings, page(cat, args.batch)))
        floor_args = ["--floor-redis", redis.url, "--floor-key", key,
                      "--floor-fields", ",".join(fields)]  # fmt: skip
        print(f"floor (echo + one HMGET of {len(fields)} fields + the log line)", flush=True)
        floor, floor_port = start_echo("floor", floor_args)
        try:
            harness.redis_pid = redis.proc.pid if redis.proc else None
            floor_peak = harness.run(floor, "floor", floor_port, bodies[args.batch], None)
            report(floor_peak)
        finally:
            floor.stop()

    # --rounds: more peak rates of each server, one after the other in every round, so that a
    # host whose speed drifts from minute to minute weighs on all of them alike
    rounds = [_round(peak, echo_peak, floor_peak)]
    baselines: list[tuple[str, list[str]]] = [("echo", [])] if not args.no_echo else []
    baselines += [("floor", floor_args)] if args.floor else []
    for r in range(1, args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        harness.counters = lambda: scrape(metrics_ports)
        harness.redis_pid = redis.proc.pid if redis.proc else None
        again = start_server(workdir / f"server-round{r + 1}.log")
        try:
            verified_call(target, requests[args.batch], expected[args.batch])
            server_round = harness.run(again, "server", port, bodies[args.batch], None)
            report(server_round)
        finally:
            again.stop()
        if server_round.failed or server_round.degraded:
            problems.append(f"round {r + 1}: errors or degraded answers under load")
        harness.counters = None
        others: dict[str, Point] = {}
        for name, extra in baselines:
            harness.redis_pid = redis.proc.pid if name == "floor" and redis.proc else None
            other, other_port = start_echo(name, extra)
            try:
                others[name] = harness.run(other, name, other_port, bodies[args.batch], None)
                report(others[name])
            finally:
                other.stop()
        rounds.append(_round(server_round, others.get("echo"), others.get("floor")))

    at70 = points[0.7]
    echo70 = echo_points.get(0.7)
    out: dict[str, Any] = {
        "bench": "serving",
        "workers": args.workers,
        "batch": args.batch,
        "duration_s": args.duration,
        "clients": args.clients,
        "streams": args.streams,
        "pinned": server_cpus is not None,
        "membership_budget_ms": args.membership_budget_ms,
        "rps": round(peak.rps, 1),
        "items_per_s": round(peak.rps * args.batch, 1),
        "p50_ms": peak.p50_ms,
        "p99_ms": peak.p99_ms,
        "p50_ms_at_70pct": at70.p50_ms,
        "p99_ms_at_70pct": at70.p99_ms,
        "rps_at_70pct": round(at70.rps, 1),
        # --paced: the same 70 % point from spread, individually paced callers (run_paced)
        "p99_ms_at_70pct_paced": paced.p99_ms if paced else None,
        "p50_ms_at_70pct_paced": paced.p50_ms if paced else None,
        "echo_p99_ms_at_70pct_paced": echo_paced.p99_ms if echo_paced else None,
        "server_cpu_us_per_req": _r(peak.server_cpu_us_per_req),
        "redis_cpu_us_per_req": _r(peak.redis_cpu_us_per_req),
        "echo_rps": round(echo_peak.rps, 1) if echo_peak else None,
        "echo_p99_ms_at_70pct": echo70.p99_ms if echo70 else None,
        "echo_cpu_us_per_req": _r(echo_peak.server_cpu_us_per_req) if echo_peak else None,
        "ratio_to_echo": round(peak.rps / echo_peak.rps, 3) if echo_peak else None,
        # the same ratio from CPU time per request: far less sensitive to other load on the host
        "cpu_ratio_to_echo": round(echo_peak.server_cpu_us_per_req / peak.server_cpu_us_per_req, 3)
        if echo_peak and echo_peak.server_cpu_us_per_req and peak.server_cpu_us_per_req
        else None,
        "floor_rps": round(floor_peak.rps, 1) if floor_peak else None,
        "floor_cpu_us_per_req": _r(floor_peak.server_cpu_us_per_req) if floor_peak else None,
        "floor_ratio_to_echo": round(floor_peak.rps / echo_peak.rps, 3)
        if floor_peak and echo_peak
        else None,
        # --rounds: every round's peaks and the medians of the per-round ratios
        "rounds": rounds,
        "ratio_to_echo_median": _median([r["ratio_to_echo"] for r in rounds]),
        "floor_ratio_to_echo_median": _median([r["floor_ratio_to_echo"] for r in rounds]),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
        "checks": checks,
        "ok": not problems,
        "problems": problems,
        "curve": {"server": [asdict(p) for p in [peak, *points.values()]],
                  "echo": [asdict(p) for p in ([echo_peak, *echo_points.values()] if echo_peak else [])]},
    }  # fmt: skip
    if scaling is not None:
        out[f"rps_batch{args.scaling_batch}"] = round(scaling.rps, 1)
        out[f"items_per_s_batch{args.scaling_batch}"] = round(scaling.rps * args.scaling_batch, 1)
        out["batch_cost_ratio"] = round(peak.rps / scaling.rps, 3)  # time per request, big/small
        if scaling.server_cpu_us_per_req and peak.server_cpu_us_per_req:
            out["batch_cpu_ratio"] = round(
                scaling.server_cpu_us_per_req / peak.server_cpu_us_per_req, 3
            )
    if args.plot:
        title = (
            f"BatchGetLowestPrice, batch {args.batch}, --workers {args.workers}, "
            f"{os.cpu_count()} cores{' (server pinned to CPU 1)' if server_cpus else ''}"
        )
        curves = {"server": [peak, *points.values()]}
        if echo_peak:
            curves["echo"] = [echo_peak, *echo_points.values()]
        plot(Path(args.plot), title, curves)
        out["plot"] = args.plot
    print(
        f"summary: rps {out['rps']} ({out['items_per_s']} items/s), ratio_to_echo "
        f"{out['ratio_to_echo']} (by cpu/req {out['cpu_ratio_to_echo']}; median of "
        f"{len(rounds)} rounds {out['ratio_to_echo_median']}, floor "
        f"{out['floor_ratio_to_echo_median']}), p99 at 70% "
        f"{out['p99_ms_at_70pct']} ms, batch cost ratio {out.get('batch_cost_ratio')}, "
        f"loadavg {load_start:.1f}..{out['loadavg_end']:.1f}, ok {out['ok']} {problems}"
    )
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


if __name__ == "__main__":
    main()
