"""What pygrpc-native's ``close()`` does to answers handed over just before it.

The native runtime's drain closes the front once nothing is left to answer
(``pricing_service.runtime.native``). ``close()`` drops the answers the front's I/O threads
have not taken yet, so the question is how the drain knows they have been taken. This bench
answers the same calls and closes the front right after, three ways, and counts how many
answers reached the client:

* ``none``: close at once;
* ``sleep``: wait ``--sleep-ms`` first (the drain's rule before: a quiet time);
* ``counted``: wait until the front's own metrics count every call's status (the drain's
  rule now: they are counted on the I/O threads, when they take the answer).

    python -m bench.native_close --trials 100 --calls 4 [--hogs 3]

``--hogs N`` runs N busy processes meanwhile (a busy core: the I/O thread waits for the CPU).
The last line printed is one JSON object: answers received per way, out of ``trials * calls``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
from pygrpc_native import EVENT_CANCEL, NativeGrpcFront

WAYS = ("none", "sleep", "counted")


def _finished(front: NativeGrpcFront) -> int:
    metrics: dict[str, Any] | None = front.metrics()
    assert metrics is not None
    return sum(
        sum(status["count"] for status in method["status"].values())
        for method in metrics["methods"].values()
    )


def _answer_then_close(front: NativeGrpcFront, calls: int, way: str, sleep_s: float) -> None:
    ids: list[int] = []
    while len(ids) < calls:
        events = front.recv_batch_details(64, 1000) or []
        ids += [call_id for kind, call_id, *_ in events if kind != EVENT_CANCEL]
    for call_id in ids:
        front.respond(call_id, b"a" * 2000)
    if way == "sleep":
        time.sleep(sleep_s)
    elif way == "counted":
        while _finished(front) < calls:
            pass
    front.close()


async def _trial(way: str, calls: int, sleep_s: float) -> int:
    front = NativeGrpcFront(
        "127.0.0.1:0", [("/bench.Close/Call", False)], io_threads=1, call_details=True, metrics=True
    )
    front.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.bound_port}") as channel:
        call = channel.unary_unary("/bench.Close/Call")
        await channel.channel_ready()
        server = threading.Thread(target=_answer_then_close, args=(front, calls, way, sleep_s))
        server.start()
        results = await asyncio.gather(
            *(call(b"q", timeout=3) for _ in range(calls)), return_exceptions=True
        )
        server.join()
    return sum(1 for r in results if not isinstance(r, BaseException))


def _hog() -> None:
    while True:
        pass


async def _run(trials: int, calls: int, sleep_s: float) -> dict[str, int]:
    received = dict.fromkeys(WAYS, 0)
    for _ in range(trials):
        for way in WAYS:  # interleaved: a noisy moment hits every way alike
            received[way] += await _trial(way, calls, sleep_s)
    return received


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--sleep-ms", type=float, default=2.0)
    parser.add_argument("--hogs", type=int, default=0)
    args = parser.parse_args(argv)
    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    try:
        received = asyncio.run(_run(args.trials, args.calls, args.sleep_ms / 1000))
    finally:
        for hog in hogs:
            hog.terminate()
    sent = args.trials * args.calls
    for way in WAYS:
        print(f"{way:8} {received[way]:6} of {sent} answers received")
    print(json.dumps({"sent": sent, "sleep_ms": args.sleep_ms, "hogs": args.hogs, **received}))


if __name__ == "__main__":
    main()
