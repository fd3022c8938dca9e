"""The processes under test: servers started as children (their whole process tree measured),
pinned to CPUs, on free ports; their JSON logs counted."""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from bench.harness.proc import cpu_seconds
from pricing_testing.redis_server import free_port

__all__ = [
    "ServerProcess",
    "count_log_lines",
    "free_port",
    "free_port_block",
    "pin_running",
    "pinned",
]


def pin_running(pid: int, cpus: str) -> None:
    """Move a running process, every thread of it, to the CPUs ``cpus`` (taskset)."""
    subprocess.run(["taskset", "-a", "-pc", cpus, str(pid)], check=True, capture_output=True)


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
