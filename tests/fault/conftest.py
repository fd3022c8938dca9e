"""The whole system, on services of its own, for fault injection.

Every fault test gets a private redis-server (AOF on, ``appendfsync everysec``: the setting
docs/OPERATIONS.md asks for when events must survive a Redis crash), the real
``pricing-service`` and ``sync-worker consume`` processes, and a :class:`Load` with its model.
Short timeouts everywhere so that a fault shows within a few hundred milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import service_missing
from tests.support.load import Load, LoadConfig, Population
from tests.support.procs import Proc, pricing_service, service_env, sync_worker, wait_serving
from tests.support.redis_server import RedisServer, free_port

STRICT_MAX_LAG_MS = 1000

#: Environment of every process of a fault test (on top of ``service_env``).
FAULT_ENV = {
    "PRICING_REDIS_SOCKET_TIMEOUT_MS": "500",
    "PRICING_REDIS_CONNECT_TIMEOUT_MS": "200",
    "PRICING_STRICT_MAX_LAG_MS": str(STRICT_MAX_LAG_MS),
    "PRICING_BREAKER_RESET_MS": "200",
    # a 2-core machine shared with the load generator: 50 ms is blown by CPU hiccups alone
    "PRICING_MEMBERSHIP_BUDGET_MS": "200",
    "PRICING_STREAM_CLAIM_IDLE_MS": "1000",
    "PRICING_STREAM_BATCH_SIZE": "200",
    "PRICING_GRACE_PERIOD_S": "5",
    "PRICING_LOG_LEVEL": "INFO",
}


class System:
    """Private Redis + pricing server(s) + stream consumer, started and stopped by the test."""

    def __init__(
        self, redis: RedisServer, tmp: Path, extra: Mapping[str, str] | None = None
    ) -> None:
        self.redis = redis
        self.tmp = tmp
        self.namespace = f"fault:{uuid.uuid4().hex[:8]}:"
        self.env = service_env(
            redis_url=redis.url,
            namespace=self.namespace,
            tmp=tmp,
            extra={**FAULT_ENV, **(extra or {})},
        )
        self.servers: list[Proc] = []
        self.workers: list[Proc] = []
        self._logs = 0

    @property
    def target(self) -> str:
        return self.env["PRICING_LISTEN"]

    def _log(self, name: str) -> Path:
        self._logs += 1
        return self.tmp / f"{self._logs:02d}-{name}.log"

    def start_server(self) -> Proc:
        proc = pricing_service(self.env, self._log("server"))
        self.servers.append(proc)
        wait_serving(self.target, proc)
        return proc

    def start_worker(self) -> Proc:
        proc = sync_worker(self.env, self._log("worker"), "consume")
        self.workers.append(proc)
        return proc

    def load(self, population: Population | None = None, **config: object) -> Load:
        cfg = LoadConfig(strict_max_lag_ms=STRICT_MAX_LAG_MS)
        for k, v in config.items():
            setattr(cfg, k, v)
        return Load(
            target=self.target,
            redis_url=self.redis.url,
            namespace=self.namespace,
            events_stream=self.env["PRICING_EVENTS_STREAM"],
            consumer_group=self.env["PRICING_CONSUMER_GROUP"],
            dead_letter_stream=self.env["PRICING_DEAD_LETTER_STREAM"],
            population=population or Population.make("u"),
            config=cfg,
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in self.servers + self.workers
        )

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every live process; exit codes by log name (a stuck one is killed: -9)."""
        codes = {}
        for p in self.servers + self.workers:
            if p.alive():
                codes[p.log_path.stem] = p.terminate(timeout=15)
        return codes

    def kill_all(self) -> None:
        for p in self.servers + self.workers:
            p.kill()


@pytest.fixture
def fault_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
    try:
        server.start()
    except RuntimeError as exc:
        service_missing("redis-server binary", exc)
    yield server
    server.close()


@pytest.fixture
def system(fault_redis: RedisServer, tmp_path: Path) -> Iterator[System]:
    s = System(fault_redis, tmp_path)
    try:
        yield s
    finally:
        s.kill_all()


@pytest.fixture
async def running(system: System) -> AsyncIterator[tuple[System, Load]]:
    """Server + worker started, state seeded, strict ready; the processes must exit 0 at the
    end (no process stuck)."""
    system.start_server()
    system.start_worker()
    load = system.load()
    try:
        await load.seed_state()
        await load.wait_strict_ready()
        yield system, load
    finally:
        await load.close()
    codes = system.stop_all()
    assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n{system.logs()}"


# --- a private PostgreSQL ---------------------------------------------------------------------
def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


class PostgresServer:
    """A throw-away PostgreSQL cluster in a temp dir, on a free port (run as ``postgres`` when
    the tests run as root: initdb refuses root)."""

    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb/pg_ctl) found")
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-fault-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root and no runuser to become postgres")
            self.as_user = [runuser, "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
            os.chmod(self.dir, 0o700)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stdout}{proc.stderr}")

    def init(self) -> PostgresServer:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        return self.start()

    def start(self) -> PostgresServer:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"),
            "-o", opts, "-w", "-t", "30", "start",
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("PostgreSQL did not start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except (RuntimeError, OSError, KeyError) as exc:
        service_missing("a private PostgreSQL (initdb/pg_ctl)", exc)
        raise  # unreachable: service_missing skips or fails
    try:
        server.init()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        server.close()
        service_missing("a private PostgreSQL (initdb/pg_ctl)", exc)
    yield server
    server.close()
