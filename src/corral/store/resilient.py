"""ResilientStore: the embedded store always, Redis mirrored whenever it is reachable.

Writes go to the embedded store, then to Redis. Reads come from Redis (it holds every machine's
state) and fall back to the embedded store. When Redis goes away: one warning and one event, and
the embedded store carries on alone. A monitor pings; when Redis answers again what it missed is
pushed to it (catch-up) before it is read from again.

Catch-up goes by what this process wrote while Redis was away, not by comparing clocks: machines'
clocks differ, and a clock running ahead must not let old records or events override (or hide)
another machine's. Only when both wrote the same backend meanwhile does `last_seen` decide.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from corral.endpoint import Endpoint
from corral.store.base import (
    TOPICS,
    BackendRecord,
    Change,
    CoordinatorRecord,
    Event,
    EventKind,
    NodeRegistration,
)
from corral.store.hub import QueueSubscription
from corral.store.redis import RedisStore, RedisSubscription
from corral.store.sqlite import EmbeddedStore
from corral.store.warn import Warnings

# What "Redis is not there" looks like; codec errors and bugs are not in this list.
UNAVAILABLE = (RedisError, OSError, TimeoutError)
DEFAULT_RETRY_S = 2.0

T = TypeVar("T")


class _Pumps:
    """The tasks feeding one merged subscription, and the subscriptions they read."""

    def __init__(self, local: QueueSubscription) -> None:
        self.local = local
        self.remote: RedisSubscription | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.local.aclose()
        if self.remote is not None:
            await self.remote.aclose()


class ResilientStore:
    def __init__(
        self, embedded: EmbeddedStore, redis: RedisStore, *, retry_s: float = DEFAULT_RETRY_S
    ) -> None:
        self._embedded = embedded
        self._redis = redis
        self._retry_s = retry_s
        self._warnings = Warnings()  # its own; the parts' are taken with it
        self._up = True
        self._lock = asyncio.Lock()  # writes and catch-up: nothing slips between them
        # What Redis has not seen yet: written while it was away.
        self._removed: set[Endpoint] = set()
        self._unregistered: set[str] = set()
        self._unsent_backends: set[Endpoint] = set()
        self._unsent_events: deque[Event] = deque(maxlen=embedded.max_events)
        self._unsent_coordinator = False
        self._pumps: dict[QueueSubscription, _Pumps] = {}
        self._monitor: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, embedded: EmbeddedStore, redis: RedisStore, *, retry_s: float = DEFAULT_RETRY_S
    ) -> ResilientStore:
        store = cls(embedded, redis, retry_s=retry_s)
        try:
            await redis.ping()
            await store._catch_up(announce=False)  # seed Redis with what we knew before
        except UNAVAILABLE as exc:
            await store._went_down(exc)
        store._monitor = asyncio.create_task(store._watch(), name="corral-store-monitor")
        return store

    @property
    def redis_up(self) -> bool:
        return self._up

    def shared_reachable(self) -> bool | None:
        return self._up

    @property
    def warnings(self) -> list[str]:
        """The warnings not yet taken, its own and its parts' (a copy)."""
        return self._warnings.peek() + self._embedded.warnings + self._redis.warnings

    def take_warnings(self) -> list[str]:
        taken = self._warnings.take() + self._embedded.take_warnings()
        return list(dict.fromkeys(taken + self._redis.take_warnings()))

    # --- outage and catch-up -------------------------------------------------------------------

    async def _went_down(self, exc: BaseException) -> None:
        if not self._up:
            return
        self._up = False
        message = (
            f"redis {self._redis.url} unreachable ({exc or type(exc).__name__}); working from "
            f"the embedded store {self._embedded.path} until it is back"
        )
        self._warnings.add(message)
        event = Event(EventKind.WARNING, message)
        await self._embedded.add_event(event)
        self._unsent_events.append(event)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._retry_s)
            try:
                await self._redis.ping()
                if not self._up:
                    await self._catch_up(announce=True)
            except UNAVAILABLE as exc:
                await self._went_down(exc)
            except Exception as exc:  # the monitor must outlive any one bad round
                self._warnings.add(f"store monitor: {exc!r}")

    async def _catch_up(self, *, announce: bool) -> None:
        async with self._lock:
            backends, events = await self._push_view()
            self._up = True
        if announce:
            message = (
                f"redis {self._redis.url} reachable again; caught up {backends} backends, "
                f"{events} events"
            )
            await self.add_event(Event(EventKind.STORE_CAUGHT_UP, message))
            for topic in sorted(TOPICS):  # others may have changed things meanwhile
                self._embedded.notify(Change(topic))

    async def _push_view(self) -> tuple[int, int]:
        """Push what Redis missed: what it lost, and what we wrote while it was away."""
        redis, local = self._redis, self._embedded
        for endpoint in sorted(self._removed):
            await redis.remove_backend(endpoint)
        self._removed.clear()
        for node_id in sorted(self._unregistered):
            await redis.unregister_node(node_id)
        self._unregistered.clear()

        theirs = {r.endpoint: r for r in await redis.backends()}
        unsent = self._unsent_backends
        push = [
            r
            for r in await local.backends()
            if r.endpoint not in theirs  # Redis lost it (restarted empty) or never had it
            or (r.endpoint in unsent and r.last_seen >= theirs[r.endpoint].last_seen)
        ]
        await redis.put_backends(push)
        unsent.clear()

        ours_c = await local.coordinator()
        if ours_c is not None and (self._unsent_coordinator or await redis.coordinator() is None):
            await redis.set_coordinator(ours_c)
        self._unsent_coordinator = False

        for reg in await local.live_nodes():
            await redis.register_node(reg)

        if await redis.events(limit=1):
            new = list(self._unsent_events)
        else:  # an empty Redis: give it the history we have
            new = await local.events(limit=local.max_events)
        await redis.add_events(new)
        self._unsent_events.clear()
        return len(push), len(new)

    # --- plumbing ------------------------------------------------------------------------------

    async def _mirror(self, remote: Callable[[], Awaitable[None]]) -> bool:
        """Run a write on Redis if it is up; False when Redis did not get it."""
        if not self._up:
            return False
        try:
            await remote()
        except UNAVAILABLE as exc:
            await self._went_down(exc)
            return False
        return True

    async def _read(
        self, remote: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]
    ) -> T:
        if self._up:
            try:
                return await remote()
            except UNAVAILABLE as exc:
                await self._went_down(exc)
        return await local()

    # --- the Store interface -------------------------------------------------------------------

    async def register_node(self, reg: NodeRegistration) -> None:
        async with self._lock:
            await self._embedded.register_node(reg)
            self._unregistered.discard(reg.node_id)
            await self._mirror(lambda: self._redis.register_node(reg))

    async def unregister_node(self, node_id: str) -> None:
        async with self._lock:
            await self._embedded.unregister_node(node_id)
            if not await self._mirror(lambda: self._redis.unregister_node(node_id)):
                self._unregistered.add(node_id)

    async def live_nodes(self) -> list[NodeRegistration]:
        return await self._read(self._redis.live_nodes, self._embedded.live_nodes)

    async def put_backends(self, records: list[BackendRecord]) -> None:
        async with self._lock:
            await self._embedded.put_backends(records)
            self._removed.difference_update(r.endpoint for r in records)
            if not await self._mirror(lambda: self._redis.put_backends(records)):
                self._unsent_backends.update(r.endpoint for r in records)

    async def remove_backend(self, endpoint: Endpoint) -> None:
        async with self._lock:
            await self._embedded.remove_backend(endpoint)
            self._unsent_backends.discard(endpoint)
            if not await self._mirror(lambda: self._redis.remove_backend(endpoint)):
                self._removed.add(endpoint)

    async def backends(self) -> list[BackendRecord]:
        return await self._read(self._redis.backends, self._embedded.backends)

    async def set_coordinator(self, record: CoordinatorRecord) -> None:
        async with self._lock:
            await self._embedded.set_coordinator(record)
            if not await self._mirror(lambda: self._redis.set_coordinator(record)):
                self._unsent_coordinator = True

    async def coordinator(self) -> CoordinatorRecord | None:
        return await self._read(self._redis.coordinator, self._embedded.coordinator)

    async def add_event(self, event: Event) -> None:
        async with self._lock:
            await self._embedded.add_event(event)
            if not await self._mirror(lambda: self._redis.add_event(event)):
                self._unsent_events.append(event)

    async def events(self, limit: int = 100) -> list[Event]:
        return await self._read(
            lambda: self._redis.events(limit), lambda: self._embedded.events(limit)
        )

    async def legacy_backends(self) -> list[Endpoint]:
        return await self._read(self._redis.legacy_backends, self._embedded.legacy_backends)

    # --- subscriptions -------------------------------------------------------------------------

    async def subscribe(self) -> QueueSubscription:
        """This process's changes from the embedded store, other machines' from Redis."""
        out = QueueSubscription(self._unsubscribe)
        pumps = _Pumps(await self._embedded.subscribe())
        if self._up:
            try:
                pumps.remote = await self._redis.subscribe(skip_origin=self._redis.origin)
            except UNAVAILABLE as exc:
                await self._went_down(exc)
        pumps.tasks = [
            asyncio.create_task(self._pump_local(pumps, out)),
            asyncio.create_task(self._pump_remote(pumps, out)),
        ]
        self._pumps[out] = pumps
        return out

    async def _unsubscribe(self, out: QueueSubscription) -> None:
        pumps = self._pumps.pop(out, None)
        if pumps is not None:
            await pumps.stop()

    async def _pump_local(self, pumps: _Pumps, out: QueueSubscription) -> None:
        async for change in pumps.local:
            out.put(change)
        out.end()  # the embedded store closed

    async def _pump_remote(self, pumps: _Pumps, out: QueueSubscription) -> None:
        while not out.closed:
            if pumps.remote is None:
                await asyncio.sleep(self._retry_s)
                if not self._up:
                    continue
                try:
                    pumps.remote = await self._redis.subscribe(skip_origin=self._redis.origin)
                except UNAVAILABLE:
                    continue
            try:
                async for change in pumps.remote:
                    out.put(change)
                return  # closed on purpose
            except Exception as exc:  # whatever broke it, subscribe again next round
                if isinstance(exc, UNAVAILABLE):
                    await self._went_down(exc)
                else:
                    self._warnings.add(f"redis subscription: {exc!r}; resubscribing")
                with contextlib.suppress(Exception):
                    await pumps.remote.aclose()
                pumps.remote = None

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        for out in list(self._pumps):
            await out.aclose()
        await self._redis.close()
        await self._embedded.close()
