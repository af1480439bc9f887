"""The dashboard's in-memory view of the store, kept fresh by the store's change notifications.

One subscription per app, not per browser: `LiveView.run()` listens to `store.subscribe()`,
re-reads the store on every change (and every `refresh_s` anyway, for writers the subscription
cannot see), keeps the serialised `/api/rpc_backends` body ready, and fans changes out to every
open event stream. Requests read this view; none of them scans or probes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from corral.store.base import BackendRecord, CoordinatorRecord, Event, Store
from corral.web.control import CoordinatorControl
from corral.web.schemas import (
    backend_to_json,
    coordinator_from_record,
    coordinator_from_status,
    endpoints_in_use,
    event_to_json,
)

log = logging.getLogger(__name__)

StreamItem = tuple[str, bytes]


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False).encode()


def _same(a: list[BackendRecord], b: list[BackendRecord] | None) -> bool:
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class Listener:
    """One open event stream's mailbox. A client that falls `limit` messages behind is closed
    (its EventSource reconnects and starts again from a fresh snapshot)."""

    def __init__(self, limit: int) -> None:
        self._items: deque[StreamItem] = deque()
        self._ready = asyncio.Event()
        self._limit = limit
        self.closed = False

    def push(self, item: StreamItem) -> None:
        if self.closed:
            return
        if len(self._items) >= self._limit:
            self.close()
            return
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def get(self, wait_s: float) -> StreamItem | None:
        """The next item; None after `wait_s` with nothing; raises EOFError once closed."""
        if not self._items and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait_s)
        if self._items:
            item = self._items.popleft()
            if not self._items:
                self._ready.clear()
            return item
        if self.closed:
            raise EOFError
        self._ready.clear()
        return None


class LiveView:
    def __init__(
        self,
        store: Store,
        control: CoordinatorControl | None,
        *,
        refresh_s: float = 1.0,
        event_window: int = 100,
        listener_limit: int = 256,
    ) -> None:
        self.store = store
        self.control = control
        self.refresh_s = refresh_s
        self.event_window = event_window
        self.listener_limit = listener_limit
        self.records: list[BackendRecord] = []
        self.record: CoordinatorRecord | None = None
        self.backends_items: list[dict[str, Any]] = []
        self.backends_body: bytes = b"[]"
        self.nodes_live = 0
        self.refreshed_at: float | None = None  # monotonic
        self.refreshes = 0
        self.store_error: str | None = None
        # Filled by the proxy from llama-server's own timings, when the controller has none.
        self.observed_tps: float | None = None
        self._coordinator_key: bytes = b""
        self._encoded_from: list[BackendRecord] | None = None
        self._encoded_in_use: object = None
        self._seen_events: set[tuple[Any, ...]] | None = None
        self._listeners: set[Listener] = set()
        # Called after each refresh (the history's feed); one that raises is logged, not fatal.
        self.on_refresh: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._first = asyncio.Event()
        self._following = asyncio.Event()

    # ---- reading --------------------------------------------------------------------------

    def coordinator(self) -> dict[str, Any]:
        if self.control is not None:
            return coordinator_from_status(self.control.status(), self.observed_tps)
        return coordinator_from_record(self.record, self.observed_tps)

    def snapshot_age_s(self) -> float | None:
        if self.refreshed_at is None:
            return None
        return round(time.monotonic() - self.refreshed_at, 3)

    async def wait_first(self, wait_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), wait_s)
        return self._first.is_set()

    # ---- streams --------------------------------------------------------------------------

    @contextlib.contextmanager
    def listen(self) -> Iterator[Listener]:
        listener = Listener(self.listener_limit)
        listener.push(("backends", self.backends_body))
        listener.push(("coordinator", dumps(self.coordinator())))
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)

    @property
    def listener_count(self) -> int:
        return len(self._listeners)

    def close_streams(self) -> None:
        for listener in list(self._listeners):
            listener.close()

    def _broadcast(self, name: str, body: bytes) -> None:
        for listener in list(self._listeners):
            listener.push((name, body))

    # ---- keeping fresh --------------------------------------------------------------------

    def poke(self) -> None:
        """Ask for a refresh now (a change happened)."""
        self._wake.set()

    async def refresh(self) -> None:
        store = self.store
        records = await store.backends()
        record = await store.coordinator()
        events = await store.events(self.event_window)
        nodes = await store.live_nodes()
        self.records, self.record, self.nodes_live = records, record, len(nodes)

        coordinator = self.coordinator()
        in_use = endpoints_in_use(coordinator)
        # The store hands back the very objects it decoded before for rows that did not change;
        # the same rows and the same in-use set make the same body, so it is not rebuilt.
        if not _same(records, self._encoded_from) or in_use != self._encoded_in_use:
            items = [backend_to_json(r, r.in_use or str(r.endpoint) in in_use) for r in records]
            items.sort(key=lambda item: (item["host"], item["port"]))
            body = dumps(items)
            self._encoded_from, self._encoded_in_use = records, in_use
            if body != self.backends_body:
                self.backends_items, self.backends_body = items, body
                self._broadcast("backends", body)

        key = dumps({k: v for k, v in coordinator.items() if k != "uptime_s"})
        if key != self._coordinator_key:
            self._coordinator_key = key
            self._broadcast("coordinator", dumps(coordinator))

        self._new_events(events)
        self.refreshed_at = time.monotonic()
        self.refreshes += 1
        self.store_error = None
        self._first.set()
        for hook in self.on_refresh:
            try:
                hook()
            except Exception:
                log.exception("dashboard: an after-refresh hook failed")

    def _new_events(self, events: list[Event]) -> None:
        keys = [(e.ts, str(e.kind), e.message, str(e.endpoint)) for e in events]
        seen = self._seen_events
        if seen is not None:
            for key, ev in zip(keys, events, strict=True):
                if key not in seen:
                    self._broadcast("event", dumps(event_to_json(ev)))
        self._seen_events = set(keys)

    async def run(self) -> None:
        """Until cancelled: follow the store's notifications, refresh on each (and on a timer)."""
        follower = asyncio.create_task(self._follow())
        with contextlib.suppress(TimeoutError):  # subscribe before the first read
            await asyncio.wait_for(self._following.wait(), 2.0)
        try:
            while True:
                try:
                    await self.refresh()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.store_error = f"{type(exc).__name__}: {exc}"
                    log.warning("dashboard: reading the store failed: %s", self.store_error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.refresh_s)
                self._wake.clear()
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            self.close_streams()

    async def _follow(self) -> None:
        delay = 0.5
        while True:
            try:
                sub = await self.store.subscribe()
                try:
                    self._following.set()
                    self._wake.set()  # whatever changed before we listened
                    async for _change in sub:
                        delay = 0.5
                        self._wake.set()
                finally:
                    await sub.aclose()
                log.warning("dashboard: store subscription ended; resubscribing")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("dashboard: store subscription failed (%s); polling meanwhile", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
