"""The serving path's pipelined reader against real redis-server processes.

Each promise of ``pricing_service.redis_pipe``: replies matched to their commands under
concurrency, late replies dropped without shifting later ones, a killed / hung / restarted Redis
turned into prompt ``RedisError``s and a reconnect, bounded waiting, AUTH + SELECT, TLS.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pricing_service.config import load_settings
from pricing_service.redis_client import make_redis
from pricing_service.redis_pipe import PipelinedReader, encode_command
from pricing_testing.certs import make_certs
from pricing_testing.redis_server import RedisServer


def test_encode_command_is_resp() -> None:
    assert encode_command((b"HMGET", "k", b"f\r\n")) == (
        b"*3\r\n$5\r\nHMGET\r\n$1\r\nk\r\n$3\r\nf\r\n\r\n"
    )


async def test_hmget_memoised_fields_answer_as_redis_py(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    """The memoised RESP of a field list is the same command every time: the same replies as
    redis-py's own HMGET, for str and bytes keys and fields (unicode, CR/LF, empty), lists and
    tuples, a field list asked again under another key, and after the memo is cleared."""
    from pricing_service import redis_pipe  # noqa: PLC0415

    fields: list[list[bytes | str]] = [
        [b"a", "b", "\u00e9t\u00e9", b"x\r\ny", b""],
        ["a"],
        [b"b", b"a", b"b"],
        [f"f{i}" for i in range(40)],
    ]
    keys: list[bytes | str] = ["k:1", b"k:2", "k:\u00fc"]
    for k in keys:
        await client.hset(k, mapping={"a": b"A", "b": b"B", "\u00e9t\u00e9": b"E", "f7": b"7"})
    reader = PipelinedReader.from_client(client)
    try:
        for _round in range(2):
            for k in keys:
                for f in fields:
                    want = await client.hmget(k, f)
                    assert await reader.hmget(k, f) == want
                    assert await reader.hmget(k, tuple(f)) == want
            redis_pipe.MAX_MEMOISED_FIELD_LISTS, saved = 1, redis_pipe.MAX_MEMOISED_FIELD_LISTS
            try:
                assert await reader.hmget(keys[0], fields[0]) == await client.hmget(
                    keys[0], fields[0]
                )
            finally:
                redis_pipe.MAX_MEMOISED_FIELD_LISTS = saved
    finally:
        await reader.aclose()


@pytest.fixture
async def client(private_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = make_redis(load_settings(redis_url=private_redis.url))
    yield c
    await c.aclose()


async def test_concurrent_calls_each_get_their_own_reply(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    for u in range(50):
        await client.hset(f"cm:{u}", mapping={"a": f"{u}-a", "b": f"{u}-b"})
    reader = PipelinedReader.from_client(client)
    try:

        async def ask(u: int) -> list[bytes | None]:
            return await reader.hmget(f"cm:{u}", [b"b", b"zz", "a"])

        for _ in range(5):
            replies = await asyncio.gather(*(ask(u) for u in range(50)))
            assert replies == [[f"{u}-b".encode(), None, f"{u}-a".encode()] for u in range(50)]
        assert await reader.hmget("cm:nobody", [b"a"]) == [None]
        assert await reader.execute(b"PING") == b"PONG"
        assert reader.pending == 0
    finally:
        await reader.aclose()


async def test_commands_of_one_loop_iteration_are_written_together(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    """The calls a batch of RPCs starts in one iteration of the loop reach Redis in one write
    (one syscall, not one each), in their order, and each still gets its own reply; a call on
    its own is written by itself, without waiting for another."""
    for u in range(20):
        await client.hset(f"cw:{u}", mapping={"a": f"{u}-a"})
    reader = PipelinedReader.from_client(client)
    try:
        assert await reader.execute(b"PING") == b"PONG"  # connected
        proto = reader._proto
        assert proto is not None and proto.transport is not None
        transport = proto.transport
        writes: list[bytes] = []
        real_write = transport.write

        def spy(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            real_write(data)

        transport.write = spy  # type: ignore[method-assign]
        replies = await asyncio.gather(*(reader.hmget(f"cw:{u}", ["a"]) for u in range(20)))
        assert replies == [[f"{u}-a".encode()] for u in range(20)]
        assert len(writes) == 1
        assert writes[0].count(b"HMGET") == 20
        assert writes[0].index(b"cw:0\r\n") < writes[0].index(b"cw:19\r\n")
        writes.clear()
        assert await reader.hmget("cw:3", ["a"]) == [b"3-a"]
        assert len(writes) == 1 and writes[0].count(b"HMGET") == 1
    finally:
        await reader.aclose()


async def test_error_replies_are_response_errors(client: aioredis.Redis) -> None:
    await client.set("plain", "x")
    reader = PipelinedReader.from_client(client)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await reader.hmget("plain", [b"a"])
        assert await reader.execute("GET", "plain") == b"x"  # the connection is still in step
    finally:
        await reader.aclose()


async def test_a_late_reply_is_dropped_and_later_replies_still_match(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    await client.hset("k", mapping={"f": "old"})
    await client.hset("k2", mapping={"f": "new"})
    reader = PipelinedReader.from_client(client)
    try:
        assert await reader.hmget("k2", [b"f"]) == [b"new"]
        # CLIENT PAUSE holds every client's commands: the caller gives up, its reply comes later
        await client.client_pause(300, all=True)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await reader.hmget("k", [b"f"])
        assert reader.pending == 1
        # queued behind the abandoned command: must get its own reply, not "old"
        assert await reader.hmget("k2", [b"f"]) == [b"new"]
        assert reader.pending == 0
    finally:
        await reader.aclose()


async def test_a_calls_timeout_fails_it_at_its_own_deadline(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    """``timeout=`` is the serving path's budget: each waiting call fails with TimeoutError at
    its own deadline (an earlier deadline behind a later one is not held up by it), its reply
    is dropped when it comes, and a call answered in time is not failed afterwards."""
    await client.hset("k", mapping={"f": "v"})
    reader = PipelinedReader.from_client(client)
    try:
        assert await reader.hmget("k", [b"f"], timeout=1.0) == [b"v"]
        # the answered call's deadline passes without failing anything
        await asyncio.sleep(0)
        await client.client_pause(400, all=True)
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def timed_out_after(timeout: float) -> float:
            with pytest.raises(TimeoutError):
                await reader.hmget("k", [b"f"], timeout=timeout)
            return loop.time() - t0

        long = asyncio.create_task(timed_out_after(0.25))
        await asyncio.sleep(0)
        short = await timed_out_after(0.05)
        assert 0.05 <= short < 0.2  # not held up by the later deadline queued before it
        assert 0.25 <= await long < 0.39  # and the later one kept its own
        assert reader.pending == 2  # replies still owed; dropped when they come
        # after the pause: a fresh call gets its own reply, not one of the abandoned ones
        assert await reader.hmget("k", [b"f"], timeout=1.0) == [b"v"]
        assert reader.pending == 0
        # an answered call's deadline entry is discarded lazily, when the timer next fires
        await asyncio.sleep(1.05)
        assert reader._deadlines == []  # nothing kept, no timer left armed
        assert reader._timer is None
    finally:
        await reader.aclose()


async def test_a_calls_timeout_bounds_the_reconnect_too() -> None:
    """A server that accepts connections but never answers (a hung Redis behind a live port):
    the call fails at its own timeout, not after the connect timeout, and the half-made
    connection (AUTH unanswered) is not kept for the next call."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(-1)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader = PipelinedReader(
        host="127.0.0.1", port=port, password="secret", socket_timeout=5, connect_timeout=5
    )
    try:
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await reader.hmget("k", [b"f"], timeout=0.1)
            assert loop.time() - t0 < 1.0, attempt  # not the 5 s connect timeout
            assert reader._proto is None  # the unauthenticated connection was dropped
        assert len(accepted) == 2  # each call connected afresh
    finally:
        await reader.aclose()
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


async def test_killed_redis_fails_fast_then_reconnects(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    await client.hset("k", mapping={"f": "v"})
    reader = PipelinedReader.from_client(client)
    try:
        assert await reader.hmget("k", [b"f"]) == [b"v"]
        private_redis.kill()
        with pytest.raises(RedisConnectionError):
            async with asyncio.timeout(2):
                await reader.hmget("k", [b"f"])
        with pytest.raises(RedisConnectionError):  # refused, not hanging
            async with asyncio.timeout(2):
                await reader.hmget("k", [b"f"])
        private_redis.start()
        await client.hset("k", mapping={"f": "again"})
        assert await reader.hmget("k", [b"f"]) == [b"again"]
    finally:
        await reader.aclose()


async def test_hung_redis_is_abandoned_after_the_socket_timeout(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    await client.hset("k", mapping={"f": "v"})
    base = PipelinedReader.from_client(client)
    reader = PipelinedReader(host="127.0.0.1", port=base.port, socket_timeout=0.3)
    try:
        assert await reader.hmget("k", [b"f"]) == [b"v"]
        private_redis.pause()
        for _ in range(3):  # each caller is bounded by its own timeout
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await reader.hmget("k", [b"f"])
        await asyncio.sleep(0.35)
        # the oldest reply is now overdue past the socket timeout: connection given up
        with pytest.raises(RedisTimeoutError):
            await reader.hmget("k", [b"f"])
        assert reader.pending == 0
        private_redis.resume()
        assert await reader.hmget("k", [b"f"]) == [b"v"]
    finally:
        private_redis.resume()
        await reader.aclose()


async def test_waiting_commands_are_bounded(
    private_redis: RedisServer, client: aioredis.Redis
) -> None:
    base = PipelinedReader.from_client(client)
    reader = PipelinedReader(host="127.0.0.1", port=base.port, max_pending=3)
    try:
        await reader.execute(b"PING")
        private_redis.pause()
        waiting = [asyncio.create_task(reader.execute(b"PING")) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(RedisConnectionError, match="already waiting"):
            await reader.execute(b"PING")
        private_redis.resume()
        assert await asyncio.gather(*waiting) == [b"PONG"] * 3
    finally:
        private_redis.resume()
        await reader.aclose()


async def test_auth_and_database_from_the_url(private_redis: RedisServer) -> None:
    password_redis = private_redis
    admin = make_redis(load_settings(redis_url=private_redis.url))
    await admin.config_set("requirepass", "s3cret")  # after start: its readiness PING has no AUTH
    await admin.aclose()
    url = f"redis://:s3cret@127.0.0.1:{password_redis.port}/3"
    client = make_redis(load_settings(redis_url=url))
    reader = PipelinedReader.from_client(client)
    try:
        await client.hset("k", mapping={"f": "db3"})
        assert reader.db == 3
        assert await reader.hmget("k", [b"f"]) == [b"db3"]
        wrong = PipelinedReader(host="127.0.0.1", port=password_redis.port, password="nope")
        with pytest.raises(RedisError, match=r"(?i)refused|WRONGPASS|invalid"):
            await wrong.hmget("k", [b"f"])
        await wrong.aclose()
    finally:
        await reader.aclose()
        await client.aclose()


async def test_rediss_uses_the_clients_certificates(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = RedisServer(tls=certs)  # TLS only, client certificates required
    server.start()
    try:
        url = server.url
        client = make_redis(
            load_settings(
                redis_url=url,
                redis_tls_ca_file=str(certs.ca),
                redis_tls_cert_file=str(certs.client_cert),
                redis_tls_key_file=str(certs.client_key),
            )
        )
        reader = PipelinedReader.from_client(client)
        try:
            await client.hset("k", mapping={"f": "tls"})
            assert await reader.hmget("k", [b"f"]) == [b"tls"]
        finally:
            await reader.aclose()
            await client.aclose()
        untrusted_client = make_redis(load_settings(redis_url=url))
        untrusted = PipelinedReader.from_client(untrusted_client)
        with pytest.raises(RedisConnectionError, match=r"(?i)certificate|ssl"):
            await untrusted.hmget("k", [b"f"])
        await untrusted.aclose()
        await untrusted_client.aclose()
    finally:
        server.close()
