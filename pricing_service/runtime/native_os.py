"""What the native runtime does to its process that pygrpc-native 0.5 offers no call for: the
front's listening sockets (stop accepting for a drain), its I/O threads (their scheduling
policy), and its accept loop's warnings while a drain has the listener shut. Linux-only where
it reads ``/proc``; elsewhere each does nothing and says so."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import structlog

log = structlog.get_logger("pricing_service.runtime")

#: pygrpc-native's logger, and how its accept loop's warning begins when accepting fails.
NATIVE_LOGGER = "pygrpc_native.server"
ACCEPT_FAILED = "gRPC accept failed"


def stop_accepting(port: int) -> int:
    """Take this process's listening TCP sockets on ``port`` out of the port's
    ``SO_REUSEPORT`` group (``shutdown``: at once, so new connections go to the other servers
    on the port while the open ones are drained, as grpcio's server stops accepting at the
    signal; open connections are not touched). pygrpc-native offers no call for it. Returns
    how many. The front's accept loop then fails every 50 ms until the close, and logs a
    warning each time (:func:`accept_failures_unlogged`)."""
    stopped = 0
    for sock in listeners(port):
        with sock:
            with contextlib.suppress(OSError):  # Linux answers ENOTCONN, and stops it
                sock.shutdown(socket.SHUT_RD)
            stopped += 1
    return stopped


def listeners(port: int) -> list[socket.socket]:
    """This process's listening TCP sockets on ``port``, as duplicates (close them), found
    through ``/proc`` (none where it is not there)."""
    found: list[socket.socket] = []
    seen: set[str] = set()
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:") or target in seen:
            continue
        seen.add(target)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if (
                sock.type == socket.SOCK_STREAM
                and sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and sock.getsockname()[1] == port
            ):
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found


class _AcceptFailures(logging.Filter):
    """Leaves out pygrpc-native's "accept failed" warnings: its accept loop fails every 50 ms
    once its listener is shut (:func:`stop_accepting`), by design of the drain."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ACCEPT_FAILED)


@contextlib.contextmanager
def accept_failures_unlogged() -> Iterator[None]:
    logger = logging.getLogger(NATIVE_LOGGER)
    quiet = _AcceptFailures()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def thread_ids() -> set[int]:
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:  # not Linux
        return set()


def set_policy(tids: set[int], *, batch: bool) -> None:
    """``SCHED_BATCH`` (or back to ``SCHED_OTHER``) for the front's I/O threads: under it Linux
    does not let an I/O thread preempt the event loop's thread each time an answer wakes it (it
    runs when the loop waits, or on another core), so the answers of one loop iteration cost
    one wake-up, not one each (see the module docstring)."""
    policy = getattr(os, "SCHED_BATCH" if batch else "SCHED_OTHER", None)
    if policy is None or not tids:
        log.info("native_io_policy_unavailable", threads=len(tids))
        return
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError as exc:  # a thread that ended, or a sandbox that forbids it
            log.warning("native_io_policy_failed", thread=tid, error=str(exc))
