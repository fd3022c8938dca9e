"""The loader's reader thread and its queue, as one async context manager.

Rows are parsed in a reader thread while the previous batch is in Redis, so the Python work and
the Redis work overlap; the queue is bounded, so memory holds at most a few batches whatever
the snapshot size.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Final, Generic, TypeVar

T = TypeVar("T")

_END: Final = object()


class BackgroundReader(Generic[T]):
    """Iterates ``items`` in a thread, ``depth`` items ahead of :meth:`next`.

    ``async with BackgroundReader(items) as r: while (item := await r.next()) is not None: ...``.
    An exception raised while iterating is raised by :meth:`next`. On exit, however the body
    ended, the thread is told to stop, the queue is drained and the thread joined.
    """

    def __init__(
        self, items: Iterable[T], *, depth: int = 3, name: str = "snapshot-reader"
    ) -> None:
        self._items = items
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)

    def _produce(self) -> None:
        q, stop = self._q, self._stop
        try:
            for item in self._items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as exc:  # handed to the event loop
            q.put(exc)

    async def next(self) -> T | None:
        """The next item; ``None`` at the end."""
        item = await asyncio.get_running_loop().run_in_executor(None, self._q.get)
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    async def __aenter__(self) -> BackgroundReader[T]:
        self._thread.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
