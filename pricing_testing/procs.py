"""Run the real console programs (``pricing-service``, ``sync-worker``) as child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pricing_testing.redis_server import free_port


def service_env(
    *, redis_url: str, namespace: str, tmp: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for both processes, isolated by namespace, stream names and files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
    if "PRICING_SERVER_RUNTIME" in os.environ:  # the test's runtime (tests.conftest)
        env["PRICING_SERVER_RUNTIME"] = os.environ["PRICING_SERVER_RUNTIME"]
    env.update(
        {
            "PRICING_REDIS_URL": redis_url,
            "PRICING_REDIS_NAMESPACE": namespace,
            "PRICING_RULE_STORE_URL": f"sqlite:///{tmp / 'rules.db'}",
            "PRICING_LISTEN": f"127.0.0.1:{free_port()}",
            "PRICING_METRICS_PORT": "0",
            "PRICING_ADMIN_TOKEN": "test-admin-token",
            "PRICING_EVENTS_STREAM": f"{namespace}pricing:relation-events",
            "PRICING_DEAD_LETTER_STREAM": f"{namespace}pricing:relation-events:dead",
            "PRICING_CONSUMER_GROUP": f"{namespace}sync",
            "PRICING_LOG_FORMAT": "json",
            "PRICING_RULE_REFRESH_INTERVAL_MS": "100",
            "PRICING_STREAM_BLOCK_MS": "200",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


class Proc:
    """A child process whose output goes to a log file (read it when a test fails)."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            args, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, event: str, timeout: float = 30) -> None:
        """Until the log holds ``event`` (fails early if the process died)."""
        deadline = time.monotonic() + timeout
        while event not in self.log():
            if not self.alive():
                raise AssertionError(f"process exited before {event}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def pricing_service(env: Mapping[str, str], log: Path, *args: str) -> Proc:
    return Proc([sys.executable, "-m", "pricing_service", *(args or ("serve",))], env, log)


def sync_worker(env: Mapping[str, str], log: Path, *args: str) -> Proc:
    return Proc([sys.executable, "-m", "sync_worker", *args], env, log)


def run_program(
    module: str, env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` to completion, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_pricing_service(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_program("pricing_service", env, *args, timeout=timeout)


def run_sync_worker(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_program("sync_worker", env, *args, timeout=timeout)


def wait_serving(target: str, proc: Proc, timeout: float = 30) -> None:
    """Until the server's health check says SERVING (fails early if the process died)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError("server exited early:\n" + proc.log())
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError("server never became SERVING:\n" + proc.log())
