"""The tests' Redis Cluster fixture helper: a started cluster, or the test skipped (failed under
``PRICING_TEST_REQUIRE_SERVICES=1``) when the binaries are missing."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pricing_testing.redis_cluster import RedisCluster
from tests.conftest import service_missing

if TYPE_CHECKING:
    from pricing_testing.certs import CertFiles


@contextlib.contextmanager
def running_cluster(*, tls: CertFiles | None = None) -> Iterator[RedisCluster]:
    """A started 3 + 3 cluster for a fixture, closed afterwards. Without the binaries the test
    is skipped, or fails under ``PRICING_TEST_REQUIRE_SERVICES=1``."""
    c = RedisCluster(tls=tls)
    try:
        c.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        what = "redis-server and redis-cli built with TLS" if tls else "redis-server, redis-cli"
        service_missing(f"a local Redis Cluster ({what})", exc)
    try:
        yield c
    finally:
        c.close()
