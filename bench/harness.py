"""What the benchmarks share: percentiles, CPU time from ``/proc``, server processes, the h2load
driver and its load points, the Prometheus scrape, the plot.

One definition of each, so that figures are comparable across benchmarks:

* :func:`percentile` is the nearest-rank percentile (the value at rank ``ceil(q/100 * n)``);
* CPU time is user + system from ``/proc/<pid>/stat`` (:func:`cpu_seconds`), a process tree's
  from all its processes (:class:`ServerProcess`), the load generator's from the rusage of the
  waited-for children (:func:`children_cpu_seconds`), a core's busy share from ``/proc/stat``
  (:func:`core_times`).
"""

from __future__ import annotations

import math
import os
import random
import re
import resource
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


# --- statistics -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of sorted values; NaN of nothing."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return float(sorted_values[k])


def median(values: Sequence[float | None]) -> float | None:
    """The median of the known values (None of none), rounded to 3 places when averaged."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else round((known[mid - 1] + known[mid]) / 2, 3)


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a cumulative histogram ``[(upper bound, count), ...]``
    (``+Inf`` last), interpolated linearly inside its bucket as Prometheus'
    ``histogram_quantile`` does; None when empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


# --- CPU --------------------------------------------------------------------------------------


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the live processes ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICKS


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def core_times() -> dict[str, tuple[float, float]]:
    """Per core (``cpu0``, ``cpu1``, ...): (busy seconds, total seconds) since boot."""
    out: dict[str, tuple[float, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values[:8]]
                idle = ticks[3] + ticks[4]  # idle + iowait
                out[name] = ((sum(ticks) - idle) / TICKS, sum(ticks) / TICKS)
    return out


def core_busy(
    before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]]
) -> dict[str, float]:
    """Each core's busy share (0..1) between two :func:`core_times` readings."""
    out = {}
    for name, (busy, total) in after.items():
        b0, t0 = before.get(name, (0.0, 0.0))
        out[name] = round((busy - b0) / (total - t0), 3) if total > t0 else 0.0
    return out


def thread_times(pids: Sequence[int]) -> dict[str, list[float]]:
    """Per kind of thread of the processes ``pids``: [CPU s, run-queue wait s, voluntary and
    involuntary context switches] from ``/proc/<pid>/task/<tid>/{schedstat,status}``. The kind
    is ``loop`` for a process's main thread (the event loop's), else the thread's name
    (``grpc-native-io`` for pygrpc-native's I/O threads, ``python`` for other Python threads)."""
    out: dict[str, list[float]] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/comm") as f:
                    name = f.read().strip()
                with open(f"{base}/schedstat") as f:
                    run_ns, wait_ns, _ = f.read().split()
                with open(f"{base}/status") as f:
                    status = f.read()
            except OSError:
                continue
            vol = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
            invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            kind = "loop" if tid == str(pid) else name
            acc = out.setdefault(kind, [0.0, 0.0, 0.0, 0.0])
            acc[0] += int(run_ns) / 1e9
            acc[1] += int(wait_ns) / 1e9
            acc[2] += vol
            acc[3] += invol
    return out


def thread_delta(
    before: Mapping[str, list[float]], after: Mapping[str, list[float]], requests: float
) -> dict[str, dict[str, float]]:
    """Per request, by kind of thread: CPU us, run-queue wait us, context switches."""
    out = {}
    for kind, (run, wait, vol, invol) in after.items():
        r0, w0, v0, i0 = before.get(kind, [0.0, 0.0, 0.0, 0.0])
        if not requests or (run - r0) < 0.01:
            continue
        out[kind] = {
            "cpu_us": round((run - r0) / requests * 1e6, 1),
            "runq_wait_us": round((wait - w0) / requests * 1e6, 1),
            "switches": round((vol - v0 + invol - i0) / requests, 2),
            "preempted": round((invol - i0) / requests, 2),
        }
    return out


# --- processes --------------------------------------------------------------------------------


def pinned(cpus: str | None, args: list[str]) -> list[str]:
    """``args`` run on the CPUs ``cpus`` (taskset), or unpinned."""
    return ["taskset", "-c", cpus, *args] if cpus else args


class ServerProcess:
    """A child process (a server under test) and its process tree; output to ``log``."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log_path = log
        # O_APPEND: the workers share this file; each line must land whole, never interleaved
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            args, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT
        )

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(n: int) -> int:
    """A base port such that base..base+n-1 are free now."""
    for _ in range(200):
        base = random.randrange(20_000, 60_000)
        socks = []
        try:
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


def count_log_lines(path: Path, event: str) -> int:
    """Lines of a JSON log whose ``event`` is ``event``."""
    needle = f'"event": "{event}"'.encode()
    needle2 = f'"event":"{event}"'.encode()
    n = 0
    with path.open("rb") as f:
        for line in f:
            if needle in line or needle2 in line:
                n += 1
    return n


# --- Prometheus ---------------------------------------------------------------------------------


Samples = list[tuple[str, dict[str, str], float]]


def scrape(ports: Sequence[int]) -> Samples:
    """Every sample of every ``/metrics`` endpoint on ``ports`` (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    out: Samples = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            out += [(s.name, dict(s.labels), s.value) for s in fam.samples]
    return out


def histogram(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """The cumulative buckets of histogram ``name`` summed over the series matching
    ``labels`` (over every process scraped): ``[(le, count), ...]``, ``+Inf`` last."""
    sums: dict[float, float] = {}
    for sample, sample_labels, value in samples:
        if sample != f"{name}_bucket":
            continue
        if any(sample_labels.get(k) != v for k, v in labels.items()):
            continue
        le = float(sample_labels["le"])
        sums[le] = sums.get(le, 0.0) + value
    return sorted(sums.items())


def histogram_delta(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The observations between two readings of the same histogram."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


# --- load (h2load) ------------------------------------------------------------------------------


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


def _server_view(point: Point, before: Samples, after: Samples) -> None:
    """The server's own counters and histograms over a point."""

    def total(samples: Samples, name: str) -> float:
        return sum(v for n, _, v in samples if n == name)

    point.degraded = int(
        total(after, "pricing_degraded_answers_total")
        - total(before, "pricing_degraded_answers_total")
    )
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
    h2 = f"{p.h2load_cpu_us_per_req:4.0f}" if p.h2load_cpu_us_per_req else "   -"
    for kind, t in sorted(p.threads.items()):
        extra += (
            f"\n      thread {kind:15} cpu {t['cpu_us']:6.1f} us/req  run-queue wait "
            f"{t['runq_wait_us']:6.1f} us/req  switches {t['switches']:5.2f}/req "
            f"(preempted {t['preempted']:4.2f})"
        )
    print(
        f"  {p.server:16} {p.mode:8} target {target} rps {p.rps:8.1f}  p50 {p.p50_ms:6.2f} "
        f"p90 {p.p90_ms:6.2f} p99 {p.p99_ms:7.2f} max {p.max_ms:7.2f} ms  cpu/req {cpu} us "
        f"(h2load {h2})  cores busy {load}  failed {p.failed}{extra}",
        flush=True,
    )


# --- plot ---------------------------------------------------------------------------------------


def plot(
    path: Path,
    title: str,
    curves: Mapping[str, Sequence[Point]],
    *,
    target_ms: float | None = 5.0,
    styles: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """Latency (p99 solid, p50 dashed, log scale) against throughput, one colour a curve."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9, 5.5))
    palette = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    for name, points in curves.items():
        style = dict((styles or {}).get(name, {}))
        color = style.pop("color", None) or next(palette)
        # the open-loop points as the curve; the closed-loop peak (whose latency only says how
        # many calls the load kept in flight) as a star; paced points as diamonds
        opened = sorted((p for p in points if p.mode == "open"), key=lambda p: p.rps)
        if opened:
            xs = [p.rps for p in opened]
            ax.plot(xs, [p.p99_ms for p in opened], "o-", color=color, label=f"{name} p99",
                    **style)  # fmt: skip
            ax.plot(xs, [p.p50_ms for p in opened], "s--", color=color, alpha=0.5,
                    label=f"{name} p50")  # fmt: skip
        for p in points:
            if p.mode == "closed":
                ax.plot([p.rps], [p.p99_ms], "*", color=color, markersize=12)
                ax.axvline(p.rps, color=color, lw=0.6, ls=":", alpha=0.6)
            elif p.mode.startswith("paced"):
                ax.plot([p.rps], [p.p99_ms], "D", color=color, markersize=7,
                        markeredgecolor="black")  # fmt: skip
    if target_ms is not None:
        ax.axhline(target_ms, color="tab:red", lw=0.8, ls=":", label=f"p99 target {target_ms} ms")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("throughput (requests/s, log scale)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title + "\n(star: closed-loop peak; diamond: p99 with paced callers)",
                 fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
