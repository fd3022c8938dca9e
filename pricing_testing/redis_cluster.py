"""A real local Redis Cluster for tests: 3 masters + 3 replicas of redis-server on loopback.

Each node is a :class:`pricing_testing.redis_server.RedisServer` on a free port with its own
directory (``--cluster-enabled yes``, a short ``--cluster-node-timeout`` so a killed master is
replaced within a few seconds). ``redis-cli --cluster create`` assigns the slots; the harness
waits until every node reports ``cluster_state:ok`` and agrees on the slot map.

Operations a test needs while load runs:

* :meth:`RedisCluster.migrate_slots` - a resharding: slots move from one master to another
  with ``CLUSTER SETSLOT IMPORTING/MIGRATING``, ``MIGRATE`` of their keys and ``SETSLOT NODE``,
  exactly what ``redis-cli --cluster reshard`` does, so clients see ``ASK`` during the move and
  ``MOVED`` after it;
* :meth:`RedisCluster.failover` - a graceful ``CLUSTER FAILOVER`` on a replica;
* :meth:`RedisCluster.kill_master` - ``kill -9`` of a master: its replica takes over after the
  node timeout.

With ``tls`` (certificates from :mod:`pricing_testing.certs`) every node is TLS-only: clients,
replication and the cluster bus (``--tls-cluster yes``) all use TLS, clients need the test CA
and a client certificate, and :attr:`RedisCluster.url` is ``rediss+cluster://``.

Teardown (:meth:`close`) kills every process and removes every directory.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from pricing_testing.redis_server import RedisServer, free_port, redis_binary

if TYPE_CHECKING:
    from pricing_testing.certs import CertFiles

NODE_TIMEOUT_MS = 2000


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One line of ``CLUSTER NODES`` (the parts the harness uses)."""

    node_id: str
    port: int
    role: str  # "master" | "slave"
    master_id: str  # "-" for a master
    failed: bool
    slots: tuple[tuple[int, int], ...]


class RedisCluster:
    """``masters`` masters, each with ``replicas_per_master`` replicas, on 127.0.0.1."""

    def __init__(
        self, masters: int = 3, replicas_per_master: int = 1, *, tls: CertFiles | None = None
    ) -> None:
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.tls = tls
        self.servers: list[RedisServer] = []

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> RedisCluster:
        n = self.masters * (1 + self.replicas_per_master)
        try:
            for _ in range(n):
                server = RedisServer(
                    extra_args=[
                        "--cluster-enabled", "yes",
                        # an explicit bus port: the default (port + 10000) may be taken, or
                        # beyond 65535 for a high ephemeral port
                        "--cluster-port", str(free_port()),
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                        # a replica whose master died must take over even if it lost the link
                        # a little while before (the default factor refuses after ~20 s)
                        "--cluster-replica-validity-factor", "0",
                        # a (re)joining replica syncs at once, not after the default 5 s delay
                        "--repl-diskless-sync-delay", "0",
                        *(["--tls-cluster", "yes"] if self.tls else []),
                    ],
                    tls=self.tls,
                )  # fmt: skip
                self.servers.append(server)
                server.start()
            addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [
                    redis_binary("redis-cli", tls=self.tls is not None),
                    *self._cli_tls_args(),
                    "--cluster",
                    "create",
                    *addrs,
                    "--cluster-replicas",
                    str(self.replicas_per_master),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout_s,
            )
            self.wait_ok(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self.servers = []

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cli_tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        t = self.tls
        return ["--tls", "--cacert", str(t.ca), "--cert", str(t.client_cert), "--key", str(t.client_key)]  # fmt: skip

    # --- addresses --------------------------------------------------------------------------
    @property
    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    @property
    def url(self) -> str:
        """``redis+cluster://`` (``rediss+cluster://`` with TLS), every live node a seed."""
        scheme = "rediss+cluster://" if self.tls else "redis+cluster://"
        return scheme + ",".join(f"127.0.0.1:{s.port}" for s in self.live)

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS arguments for a client of this cluster ({} without TLS)."""
        if self.tls is None:
            return {}
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.tls.ca),
            "ssl_certfile": str(self.tls.client_cert),
            "ssl_keyfile": str(self.tls.client_key),
        }

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=5,
            socket_connect_timeout=2,
            **self.tls_kwargs(),
        )

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    # --- state ----------------------------------------------------------------------------------
    def nodes(self, port: int | None = None) -> list[NodeInfo]:
        """``CLUSTER NODES`` as seen by ``port`` (default: the first live node)."""
        port = port or self.live[0].port
        with contextlib.closing(self.client(port)) as c:
            parsed = _cmd(c, "CLUSTER NODES")  # a dict by address (redis-py parses it)
        out: list[NodeInfo] = []
        for addr, d in parsed.items():
            port_text = str(addr).split("@")[0].rsplit(":", 1)[-1]
            if not port_text.isdigit() or port_text == "0":
                continue  # a node still in handshake
            flags = str(d["flags"]).split(",")
            out.append(
                NodeInfo(
                    node_id=str(d["node_id"]),
                    port=int(port_text),
                    role="master" if "master" in flags else "slave",
                    master_id=str(d["master_id"]),
                    failed="fail" in flags or "fail?" in flags,
                    slots=tuple((int(r[0]), int(r[-1])) for r in d.get("slots", [])),
                )
            )
        return out

    def master_ports(self) -> list[int]:
        return [n.port for n in self.nodes() if n.role == "master" and n.slots and not n.failed]

    def replica_of(self, master_port: int) -> int:
        nodes = self.nodes()
        master = next(n for n in nodes if n.port == master_port)
        return next(n.port for n in nodes if n.master_id == master.node_id and not n.failed)

    def master_of_slot(self, s: int) -> int:
        for n in self.nodes():
            if n.role == "master" and not n.failed and any(lo <= s <= hi for lo, hi in n.slots):
                return n.port
        raise LookupError(f"no master serves slot {s}")

    def wait_ok(self, timeout_s: float = 30.0, *, replicas: bool = True) -> None:
        """Until every live node says ``cluster_state:ok`` and they agree on the masters.

        With ``replicas`` also until every master serving slots has a replica linked to it.
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                states = []
                for s in self.live:
                    with contextlib.closing(self.client(s.port)) as c:
                        states.append(self._state_ok(c))
                views = set()
                for s in self.live:
                    nodes = self.nodes(s.port)
                    masters = [n for n in nodes if n.role == "master" and n.slots and not n.failed]
                    if replicas:
                        for m in masters:
                            followers = [
                                n for n in nodes if n.master_id == m.node_id and not n.failed
                            ]
                            if len(followers) < self.replicas_per_master:
                                raise LookupError(f"{s.port} sees no replica of {m.port}")
                    views.add(tuple(sorted((n.port, n.slots) for n in masters)))
                linked = not replicas or all(self._replica_linked(p) for p in self.master_ports())
                if all(states) and len(views) == 1 and linked:
                    return
                last = f"states={states} views={len(views)} linked={linked}"
            except (redis.RedisError, LookupError, OSError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout_s}s: {last}")

    @staticmethod
    def _state_ok(c: redis.Redis) -> bool:
        info = _cmd(c, "CLUSTER INFO")  # parsed into a dict by redis-py
        if isinstance(info, dict):
            state = info.get("cluster_state", info.get(b"cluster_state"))
            return state in ("ok", b"ok")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def _replica_linked(self, master_port: int) -> bool:
        """The master has ``replicas_per_master`` replicas in sync (state ``online``)."""
        with contextlib.closing(self.client(master_port)) as c:
            info = c.info("replication")
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online"]  # fmt: skip
        return len(online) >= self.replicas_per_master

    # --- faults and operations -------------------------------------------------------------------
    def failover(self, master_port: int, timeout_s: float = 20.0) -> int:
        """Graceful ``CLUSTER FAILOVER`` on the master's replica; returns the new master's port."""
        replica = self.replica_of(master_port)
        with contextlib.closing(self.client(replica)) as c:
            _cmd(c, "CLUSTER FAILOVER")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if replica in self.master_ports() and master_port not in self.master_ports():
                self.wait_ok(max(deadline - time.monotonic(), 1.0))
                return replica
            time.sleep(0.05)
        raise RuntimeError(f"replica {replica} did not take over from {master_port}")

    def kill_master(self, master_port: int, timeout_s: float = 30.0) -> int:
        """``kill -9`` a master; wait until its replica serves its slots; returns that port.

        The killed node stays dead (:meth:`restart_node` brings it back as a replica).
        """
        replica = self.replica_of(master_port)
        self.server(master_port).kill()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if replica in self.master_ports():
                    self.wait_ok(max(deadline - time.monotonic(), 1.0), replicas=False)
                    return replica
            except (redis.RedisError, OSError, RuntimeError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"replica {replica} did not take over from killed {master_port}")

    def restart_node(self, port: int, timeout_s: float = 30.0) -> None:
        """Start a killed node again (same port and nodes.conf): it rejoins as a replica."""
        self.server(port).start()
        self.wait_ok(timeout_s)

    def migrate_slots(self, slots: range, target_port: int, *, batch: int = 100) -> int:
        """Move ``slots`` (keys included) to the master on ``target_port``; returns keys moved.

        The manual resharding protocol: ``SETSLOT IMPORTING`` on the target, ``SETSLOT
        MIGRATING`` on the source, ``MIGRATE`` of the slot's keys in batches, then ``SETSLOT
        NODE`` on both (and the other masters). Clients meanwhile get ``ASK`` for keys already
        moved and ``MOVED`` once a slot is done.
        """
        nodes = self.nodes()
        by_port = {n.port: n for n in nodes}
        target = by_port[target_port]
        masters = [n for n in nodes if n.role == "master" and n.slots and not n.failed]
        moved = 0
        with contextlib.ExitStack() as stack:
            conns = {
                n.port: stack.enter_context(contextlib.closing(self.client(n.port)))
                for n in masters
            }
            dst = conns[target_port]
            for slot in slots:
                src_port = self.master_of_slot(slot)
                if src_port == target_port:
                    continue
                src = conns[src_port]
                source = by_port[src_port]
                _cmd(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
                _cmd(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
                while True:
                    keys = _cmd(src, "CLUSTER", "GETKEYSINSLOT", slot, batch)
                    if not keys:
                        break
                    _cmd(src,
                        "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "REPLACE",
                        "KEYS", *keys,
                    )  # fmt: skip
                    moved += len(keys)
                _cmd(dst, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
                _cmd(src, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
                for port, c in conns.items():
                    if port not in (src_port, target_port):
                        _cmd(c, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        return moved


def _cmd(client: redis.Redis, *args: Any) -> Any:
    """A raw command (redis-py's ``execute_command`` is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def keyslot(key: str | bytes) -> int:
    """The cluster slot of a key (hash tags honoured), computed locally."""
    from redis.crc import key_slot  # noqa: PLC0415

    return int(key_slot(key.encode() if isinstance(key, str) else key))
