"""Run N copies of a server as forked processes that share one port (SO_REUSEPORT)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable


def fork_workers(workers: int, child: Callable[[int], int]) -> int:
    """Fork ``workers`` children running ``child(index)``; wait for all; return the worst exit code.

    Call it before any gRPC object exists (gRPC does not survive a fork). SIGTERM and SIGINT
    received by the parent are forwarded to every child, which drains and exits on its own.
    """
    children: list[int] = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                code = child(i)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst
