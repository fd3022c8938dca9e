"""Fixtures of the integration tests that run the whole system (``system``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pricing_testing.procs import Proc, pricing_service, service_env, sync_worker, wait_serving


@pytest.fixture
def system(
    redis_url: str, namespace: str, tmp_path: Path
) -> Iterator[tuple[dict[str, str], Proc, Proc]]:
    env = service_env(redis_url=redis_url, namespace=namespace, tmp=tmp_path)
    server = pricing_service(env, tmp_path / "server.log")
    worker: Proc | None = None
    try:
        wait_serving(env["PRICING_LISTEN"], server)
        worker = sync_worker(env, tmp_path / "worker.log", "consume")
        # its SIGTERM handler is in place from here on (a SIGTERM during start-up kills it)
        worker.wait_log("stream_consumer_started")
        yield env, server, worker
    finally:
        codes = {"server": server.terminate()}
        if worker is not None:
            codes["worker"] = worker.terminate()
        assert codes == {"server": 0, "worker": 0} or worker is None, (
            f"exit codes {codes}\nserver:\n{server.log()}\nworker:\n{worker.log() if worker else ''}"
        )
