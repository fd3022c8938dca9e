"""Writes acknowledged by a replica (``WAIT``), on standalone Redis and Redis Cluster alike.

:class:`ReplicaAcks` implements "a write is acknowledged only after it reached a replica": the
sync worker acknowledges stream entries only once their writes have
(``PRICING_REDIS_WAIT_REPLICAS``), so a failover cannot lose what the stream no longer holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError

from pricing_service.redis_client import is_cluster


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes (the ``{...}`` tag, or the whole key)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@dataclass(slots=True)
class ReplicaWaitResult:
    """What one :meth:`ReplicaAcks.wait` found, per primary written to."""

    primaries: int = 0
    #: the primaries (``host:port``; ``standalone``) holding the keys
    names: list[str] | None = None
    #: primaries with no connected replica: nothing to wait for, the writes are unprotected
    unprotected: list[str] | None = None
    #: primaries whose ``WAIT`` got fewer acknowledgements than asked within the timeout
    short: list[str] | None = None

    @property
    def ok(self) -> bool:
        return not self.short


class ReplicaAcks:
    """Waits until writes already made to some keys have reached ``replicas`` replicas.

    ``WAIT`` counts the writes of *its own connection*, and a pooled client gives no control
    over which connection a command uses. So for every primary that holds one of the keys,
    one pipeline on one connection does ``SET <marker>`` (a key with the same hash tag as a
    written key, so on the same primary) then ``WAIT replicas timeout``. A primary's
    replication stream is ordered: once a replica acknowledged the marker it has every
    earlier write of that primary, including ours - whichever connection made them.

    Primaries without a replica in sync (``INFO replication``, cached ``info_ttl_s``) are
    not waited for; they are reported as ``unprotected``. In a cluster, a marker that was
    redirected (its slot moved meanwhile) counts as short: the caller retries.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        marker_prefix: str,
        *,
        replicas: int = 1,
        timeout_ms: int = 1000,
        info_ttl_s: float = 5.0,
        marker_ttl_ms: int = 10_000,
    ) -> None:
        self.client = client
        self.marker_prefix = marker_prefix
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.info_ttl_s = info_ttl_s
        self.marker_ttl_ms = marker_ttl_ms
        self._replica_counts: dict[str, tuple[float, int]] = {}

    def marker(self, key: str) -> str:
        return f"{self.marker_prefix}{{{hash_tag(key)}}}"

    def forget(self) -> None:
        """Drop the cached replica counts (after a failover or an error)."""
        self._replica_counts.clear()

    async def _connected_replicas(self, name: str, node: ClusterNode | None) -> int:
        cached = self._replica_counts.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.info_ttl_s:
            return cached[1]
        if node is None:
            info = await self.client.info("replication")
        else:
            info = await cast(aioredis.RedisCluster, self.client).info(
                "replication", target_nodes=node
            )
        # replicas in sync; one still loading its first copy ("wait_bgsave", "send_bulk")
        # counts in connected_slaves but acknowledges nothing yet
        count = sum(
            1
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        )
        self._replica_counts[name] = (now, count)
        return count

    async def wait(self, keys: Iterable[str]) -> ReplicaWaitResult:
        """Marker + ``WAIT`` on every primary holding one of ``keys``."""
        result = ReplicaWaitResult(names=[], unprotected=[], short=[])
        assert result.unprotected is not None and result.short is not None
        assert result.names is not None
        if self.replicas <= 0:
            return result
        if not is_cluster(self.client):
            keys = list(keys)
            if not keys:
                return result
            result.primaries = 1
            result.names.append("standalone")
            if await self._connected_replicas("standalone", None) < self.replicas:
                result.unprotected.append("standalone")
                return result
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.marker(keys[0]), b"1", px=self.marker_ttl_ms)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            _, acks = await pipe.execute()
            if int(acks) < self.replicas:
                result.short.append("standalone")
                self.forget()
            return result
        cluster = cast(aioredis.RedisCluster, self.client)
        by_node: dict[str, tuple[ClusterNode, str]] = {}
        for key in keys:
            node = cluster.get_node_from_key(key)
            if node is not None and node.name not in by_node:
                by_node[node.name] = (node, self.marker(key))
        result.primaries = len(by_node)
        result.names.extend(by_node)
        todo: list[tuple[ClusterNode, str]] = []
        for name, (node, marker) in by_node.items():
            if await self._connected_replicas(name, node) < self.replicas:
                result.unprotected.append(name)
            else:
                todo.append((node, marker))
        if not todo:
            return result
        cpipe = cluster.pipeline()
        for node, marker in todo:
            cpipe.set(marker, b"1", px=self.marker_ttl_ms)
            cpipe.execute_command("WAIT", self.replicas, self.timeout_ms, target_nodes=node)
        replies = await cpipe.execute(raise_on_error=False)
        for i, (node, marker) in enumerate(todo):
            set_reply, acks = replies[2 * i], replies[2 * i + 1]
            if isinstance(set_reply, BaseException):
                raise set_reply
            if isinstance(acks, ResponseError):
                # "WAIT cannot be used with replica instances": the node was demoted by a
                # failover between our topology lookup and the WAIT; the marker went to the new
                # primary, unacknowledged: short, and the caller retries on the new topology
                result.short.append(node.name)
                continue
            if isinstance(acks, BaseException):
                raise acks
            moved = cluster.get_node_from_key(marker)
            if moved is None or moved.name != node.name or int(acks) < self.replicas:
                result.short.append(node.name)
        if result.short:
            self.forget()
        return result
