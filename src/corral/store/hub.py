"""In-process change notifications: one bounded asyncio queue per subscriber."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from corral.store.base import Change

QUEUE_SIZE = 256


class QueueSubscription:
    """A subscription fed by `put`; a slow reader loses the oldest changes, never blocks writers."""

    def __init__(self, on_close: Callable[[QueueSubscription], Awaitable[None]] | None = None):
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(QUEUE_SIZE)
        self._on_close = on_close
        self.closed = False

    def put(self, change: Change | None) -> None:
        if self.closed and change is not None:
            return
        if self._queue.full():
            # Changes say "look again"; dropping the oldest loses nothing a reader needs.
            self._queue.get_nowait()
        self._queue.put_nowait(change)

    def end(self) -> None:
        if not self.closed:
            self.closed = True
            self.put(None)

    def __aiter__(self) -> QueueSubscription:
        return self

    async def __anext__(self) -> Change:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # stay ended for every later call
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self.end()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            await on_close(self)


class Hub:
    def __init__(self) -> None:
        self._subs: set[QueueSubscription] = set()

    def subscribe(self) -> QueueSubscription:
        sub = QueueSubscription(self._discard)
        self._subs.add(sub)
        return sub

    async def _discard(self, sub: QueueSubscription) -> None:
        self._subs.discard(sub)

    def publish(self, change: Change) -> None:
        for sub in self._subs:
            sub.put(change)

    def close(self) -> None:
        for sub in self._subs:
            sub.end()
        self._subs.clear()
