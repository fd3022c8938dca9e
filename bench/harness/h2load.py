"""The h2load driver: load points (closed loop, open loop at a rate, paced callers) against a
server process, with the CPU the machine spent on each (:mod:`bench.harness.proc`) and the
server's own histograms over it (:mod:`bench.harness.prometheus`); one line per point."""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness.proc import (
    children_cpu_seconds,
    core_busy,
    core_times,
    cpu_seconds,
    thread_delta,
    thread_times,
)
from bench.harness.prometheus import Samples, histogram, histogram_delta
from bench.harness.servers import ServerProcess, pinned
from bench.harness.stats import bucket_quantile, percentile


@dataclass(slots=True)
class Point:
    """One load point: h2load's view of it, and the CPU the machine spent on it."""

    server: str
    mode: str  # closed | open | paced<K>
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
    #: the load generator's CPU per request (h2load processes, warm-up and connecting included)
    h2load_cpu_us_per_req: float | None = None
    #: busy share of each core over the measured window (``cpu0``: the load core when pinned)
    core_busy: dict[str, float] = field(default_factory=dict)
    #: the server's threads per request, by kind (:func:`thread_delta`)
    threads: dict[str, dict[str, float]] = field(default_factory=dict)
    #: answers the server gave with list prices during this point (warm-up included)
    degraded: int | None = None
    #: the server's own histograms over the point (bucket-interpolated): the membership
    #: round trip to Redis and the RPC as the pipeline timed it
    redis_rtt_p50_ms: float | None = None
    redis_rtt_p99_ms: float | None = None
    rpc_p50_ms: float | None = None
    rpc_p99_ms: float | None = None
    #: the native runtime's time per call (arrival to answer, queueing to and from the event
    #: loop included): minus the RPC's, the time calls waited in the runtime
    runtime_p50_ms: float | None = None
    runtime_p99_ms: float | None = None
    #: the native runtime's event-loop waits and front receives per RPC (warm-up included)
    pump: dict[str, float] = field(default_factory=dict)


#: requests/s of one paced h2load connection: at most one request per 10 ms timer tick
PACED_CLIENT_RPS = 90
_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


@dataclass(slots=True)
class ServerStats:
    """What the harness reads of a server around each point (None: nothing to read)."""

    #: the server's Prometheus samples (all workers)
    scrape: Callable[[], Samples] | None = None
    #: Redis's pid, for its CPU
    redis_pid: int | None = None


@dataclass(slots=True)
class Harness:
    """h2load settings shared by every load point of every server of one run."""

    workdir: Path
    path: str  # the gRPC method's path
    clients: int
    streams: int
    duration_s: float
    warmup_s: float
    h2load_cpus: str | None
    runs: int = 0

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
        args.append(f"http://127.0.0.1:{port}{self.path}")
        return pinned(self.h2load_cpus, args)

    def _measure(
        self,
        server: ServerProcess,
        stats: ServerStats,
        name: str,
        mode: str,
        rps_total: float | None,
        commands: Sequence[tuple[list[str], Path]],
        stagger_s: float = 0.0,
    ) -> Point:
        """Run the h2load ``commands`` (``stagger_s`` apart) against ``server``; one Point from
        all their outputs and per-request logs, with the CPU over the measured window."""
        before = stats.scrape() if stats.scrape else None
        h2load_cpu0 = children_cpu_seconds()
        procs = []
        for args, _ in commands:
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            if stagger_s:
                time.sleep(stagger_s)
        time.sleep(self.warmup_s + 0.2)  # connect + warm-up: not part of the CPU accounting
        cpu0 = server.cpu_s()
        threads0 = thread_times(server.pids())
        rcpu0 = cpu_seconds([stats.redis_pid]) if stats.redis_pid else 0.0
        cores0 = core_times()
        t0 = time.monotonic()
        outs = [proc.communicate(timeout=self.duration_s + self.warmup_s + 60)[0] for proc in procs]
        # the measured window ends at duration; the tail of communicate() is idle time
        elapsed = min(time.monotonic() - t0, self.duration_s - 0.2)
        cpu = server.cpu_s() - cpu0
        threads1 = thread_times(server.pids())
        busy = core_busy(cores0, core_times())
        rcpu = (cpu_seconds([stats.redis_pid]) - rcpu0) if stats.redis_pid else 0.0
        h2load_cpu = children_cpu_seconds() - h2load_cpu0
        after = stats.scrape() if stats.scrape else None
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
        point = Point(
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
            if stats.redis_pid and done_in_window
            else None,
            h2load_cpu_us_per_req=h2load_cpu / total * 1e6 if total else None,
            core_busy=busy,
            threads=thread_delta(threads0, threads1, done_in_window),
        )
        if before is not None and after is not None:
            _server_view(point, before, after)
        return point

    def run(
        self,
        server: ServerProcess,
        stats: ServerStats,
        name: str,
        port: int,
        body: Path,
        rps_total: float | None,
    ) -> Point:
        """One load point from one h2load: closed loop (``rps_total`` None) or its rate mode."""
        self.runs += 1
        log = self.workdir / f"h2load-{self.runs}.tsv"
        streams = self.streams if rps_total is None else max(self.streams, 64)
        per = None if rps_total is None else rps_total / self.clients
        args = self._h2load(body, port, log, self.clients, streams, per)
        mode = "closed" if rps_total is None else "open"
        return self._measure(server, stats, name, mode, rps_total, [(args, log)])

    def run_paced(
        self,
        server: ServerProcess,
        stats: ServerStats,
        name: str,
        port: int,
        body: Path,
        rps_total: float,
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
            server, stats, name, f"paced{k}", rps_total, commands, stagger_s=1 / rps_total
        )

    def curve(
        self,
        server: ServerProcess,
        stats: ServerStats,
        name: str,
        port: int,
        body: Path,
        fractions: Sequence[float],
    ) -> tuple[Point, dict[float, Point]]:
        """The closed-loop peak, then open-loop points at ``fractions`` of it."""
        peak = self.run(server, stats, name, port, body, None)
        report(peak)
        points = {}
        for frac in fractions:
            p = self.run(server, stats, name, port, body, peak.rps * frac)
            report(p)
            points[frac] = p
        return peak, points


def _pump_counts(samples: Samples) -> defaultdict[str, float]:
    """``pricing_native_pump_total`` by event, summed over the server processes."""
    out: defaultdict[str, float] = defaultdict(float)
    for name, labels, value in samples:
        if name == "pricing_native_pump_total":
            out[labels.get("event", "")] += value
    return out


def _server_view(point: Point, before: Samples, after: Samples) -> None:
    """The server's own counters and histograms over a point."""

    def total(samples: Samples, name: str) -> float:
        return sum(v for n, _, v in samples if n == name)

    point.degraded = int(
        total(after, "pricing_degraded_answers_total")
        - total(before, "pricing_degraded_answers_total")
    )
    rpcs = total(after, "pricing_rpc_latency_seconds_count") - total(
        before, "pricing_rpc_latency_seconds_count"
    )
    if rpcs > 0:
        b, a = _pump_counts(before), _pump_counts(after)
        point.pump = {event: round((n - b[event]) / rpcs, 3) for event, n in a.items()}
    rtt = histogram_delta(
        histogram(before, "pricing_redis_round_trip_seconds", op="batch_lookup"),
        histogram(after, "pricing_redis_round_trip_seconds", op="batch_lookup"),
    )
    rpc = histogram_delta(
        histogram(before, "pricing_rpc_latency_seconds", method="BatchGetLowestPrice"),
        histogram(after, "pricing_rpc_latency_seconds", method="BatchGetLowestPrice"),
    )
    runtime = histogram_delta(
        histogram(before, "pricing_runtime_call_seconds", method="BatchGetLowestPrice"),
        histogram(after, "pricing_runtime_call_seconds", method="BatchGetLowestPrice"),
    )
    for attr, buckets, q in (
        ("redis_rtt_p50_ms", rtt, 0.5),
        ("redis_rtt_p99_ms", rtt, 0.99),
        ("rpc_p50_ms", rpc, 0.5),
        ("rpc_p99_ms", rpc, 0.99),
        ("runtime_p50_ms", runtime, 0.5),
        ("runtime_p99_ms", runtime, 0.99),
    ):
        value = bucket_quantile(buckets, q)
        setattr(point, attr, None if value is None else round(value * 1000, 3))


def report(p: Point) -> None:
    """One line per load point."""
    target = f"{p.target_rps:8.0f}" if p.target_rps is not None else "  (peak)"
    cpu = f"{p.server_cpu_us_per_req:5.0f}" if p.server_cpu_us_per_req else "    -"
    load = "/".join(f"{v:.2f}" for _, v in sorted(p.core_busy.items()))
    extra = ""
    if p.degraded is not None:
        extra += f"  degraded {p.degraded}"
    if p.redis_rtt_p99_ms is not None:
        extra += f"  redis rtt p50/p99 {p.redis_rtt_p50_ms}/{p.redis_rtt_p99_ms} ms"
    if p.rpc_p99_ms is not None:
        extra += f"  in-server p50/p99 {p.rpc_p50_ms}/{p.rpc_p99_ms} ms"
    if p.runtime_p99_ms is not None:
        extra += f" (runtime {p.runtime_p50_ms}/{p.runtime_p99_ms})"
    if p.pump:
        extra += "\n      loop per rpc: " + ", ".join(f"{k} {v:.2f}" for k, v in p.pump.items())
    h2 = f"{p.h2load_cpu_us_per_req:4.0f}" if p.h2load_cpu_us_per_req else "   -"
    for kind, t in sorted(p.threads.items()):
        extra += (
            f"\n      thread {kind:15} cpu {t['cpu_us']:6.1f} us/req (kernel {t['sys_us']:5.1f})  "
            f"run-queue wait "
            f"{t['runq_wait_us']:6.1f} us/req  switches {t['switches']:5.2f}/req "
            f"(preempted {t['preempted']:4.2f})"
        )
    print(
        f"  {p.server:16} {p.mode:8} target {target} rps {p.rps:8.1f}  p50 {p.p50_ms:6.2f} "
        f"p90 {p.p90_ms:6.2f} p99 {p.p99_ms:7.2f} max {p.max_ms:7.2f} ms  cpu/req {cpu} us "
        f"(h2load {h2})  cores busy {load}  failed {p.failed}{extra}",
        flush=True,
    )
