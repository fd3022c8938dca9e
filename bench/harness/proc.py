"""CPU time and memory of processes, from ``/proc`` (Linux) and ``getrusage``.

* :func:`cpu_seconds`: user + system CPU of live processes from ``/proc/<pid>/stat``;
* :func:`children_cpu_seconds` / :func:`self_cpu_seconds`: the rusage of the waited-for
  children (the load generator) / of this process;
* :func:`core_times` / :func:`core_busy`: each core's busy share from ``/proc/stat``;
* :func:`thread_times` / :func:`thread_delta`: per kind of thread, from ``/proc/<pid>/task``;
* :func:`rss_kb`: a process's resident set from ``/proc/<pid>/status``, :func:`max_rss_kb`
  this process's largest;
* :func:`redis_cpu_seconds`: a Redis server's own CPU from its ``INFO cpu`` section.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping, Sequence
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


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


_TICKS = os.sysconf("SC_CLK_TCK")


def thread_times(pids: Sequence[int]) -> dict[str, list[float]]:
    """Per kind of thread of the processes ``pids``: [CPU s, run-queue wait s, voluntary and
    involuntary context switches, system (kernel) CPU s] from
    ``/proc/<pid>/task/<tid>/{schedstat,status,stat}``. The kind
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
                with open(f"{base}/stat") as f:
                    # after the ")" closing the name: state is field 3, stime field 15
                    stime_ticks = int(f.read().rsplit(")", 1)[1].split()[12])
            except OSError:
                continue
            vol = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
            invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            kind = "loop" if tid == str(pid) else name
            acc = out.setdefault(kind, [0.0, 0.0, 0.0, 0.0, 0.0])
            acc[0] += int(run_ns) / 1e9
            acc[1] += int(wait_ns) / 1e9
            acc[2] += vol
            acc[3] += invol
            acc[4] += stime_ticks / _TICKS
    return out


def thread_delta(
    before: Mapping[str, list[float]], after: Mapping[str, list[float]], requests: float
) -> dict[str, dict[str, float]]:
    """Per request, by kind of thread: CPU us (of it in the kernel), run-queue wait us,
    context switches."""
    out = {}
    for kind, (run, wait, vol, invol, sys) in after.items():
        r0, w0, v0, i0, s0 = before.get(kind, [0.0, 0.0, 0.0, 0.0, 0.0])
        if not requests or (run - r0) < 0.01:
            continue
        out[kind] = {
            "cpu_us": round((run - r0) / requests * 1e6, 1),
            "sys_us": round((sys - s0) / requests * 1e6, 1),
            "runq_wait_us": round((wait - w0) / requests * 1e6, 1),
            "switches": round((vol - v0 + invol - i0) / requests, 2),
            "preempted": round((invol - i0) / requests, 2),
        }
    return out


def self_cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kb(pid: int | str = "self") -> int:
    """Resident set size (kB) of process ``pid`` (``"self"``: this one); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def max_rss_kb() -> int:
    """The largest resident set size (kB) this process has had (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def redis_cpu_seconds(info: Mapping[str, Any]) -> float:
    """User + system CPU seconds of a Redis server from its ``INFO cpu`` reply (the caller
    asks, with whichever client it has)."""
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
