"""Redis outages with a real server stopped and restarted; the factory's choice of store.

During an outage the store keeps working from the embedded file, warns once (however many
rounds its monitor tries), and local subscribers still hear changes; when Redis is back it
catches up (removals applied, newer remote records kept, no trust in clocks that differ) and
other machines' changes reach our subscribers again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from corral.endpoint import Endpoint
from corral.store.base import Change, Event, EventKind, Store, Subscription
from corral.store.factory import open_store, redis_url_from
from corral.store.redis import RedisStore
from corral.store.resilient import ResilientStore
from corral.store.sqlite import EmbeddedStore
from tests.support.records import EP, EP6, backend, coordinator, node
from tests.support.redis_server import RedisServer
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(30)  # bounded even when something hangs

OTHER = Endpoint("10.7.7.7", 50052)


class CountedRedisStore(RedisStore):
    """A RedisStore that counts its pings: each is one round of the store's monitor."""

    pings = 0

    async def ping(self) -> None:
        self.pings += 1
        await super().ping()


async def hear(sub: Subscription, wanted: Callable[[Change], bool], what: str) -> Change:
    """The first change `wanted` accepts (others are passed over), within a bound."""

    async def first() -> Change:
        async for change in sub:
            if wanted(change):
                return change
        raise AssertionError(f"subscription ended before {what}")

    try:
        return await asyncio.wait_for(first(), 5)
    except TimeoutError:
        raise AssertionError(f"no change within 5 s: {what}") from None


@pytest.fixture
async def resilient(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[ResilientStore]:
    store = await open_store(redis_server.url, tmp_path, environ={}, retry_s=0.1)
    assert isinstance(store, ResilientStore)
    yield store
    await store.close()


async def observe(server: RedisServer) -> RedisStore:
    """Another machine's view of the shared Redis."""
    return RedisStore(server.url)


async def test_outage_keeps_working_then_catches_up(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    redis = CountedRedisStore(redis_server.url)
    store = await ResilientStore.open(
        await EmbeddedStore.open(tmp_path / "state.db"), redis, retry_s=0.1
    )
    try:
        await _outage_and_catch_up(store, redis, redis_server)
    finally:
        await store.close()


async def _outage_and_catch_up(
    store: ResilientStore, redis: CountedRedisStore, redis_server: RedisServer
) -> None:
    assert store.redis_up
    sub = await store.subscribe()
    await store.put_backends([backend(EP, last_seen=time.time())])

    await asyncio.to_thread(redis_server.stop)
    during = Event(EventKind.COORDINATOR_RESTARTED, "backend lost", EP, time.time())
    await store.put_backends([backend(EP6, last_seen=time.time())])
    await store.set_coordinator(coordinator())
    await store.add_event(during)
    reg = node(heartbeat_s=30, last_heartbeat=time.time())
    await store.register_node(reg)
    assert not store.redis_up
    assert [r.endpoint for r in await store.backends()] == [EP, EP6]  # from the embedded store
    assert await store.coordinator() == coordinator()
    assert await store.live_nodes() == [reg]
    # Local subscribers still hear changes.
    await hear(sub, lambda c: c == Change("coordinator"), "the coordinator change")

    rounds = redis.pings
    await until(lambda: redis.pings >= rounds + 3, 5, "three monitor rounds against a dead server")
    warned = [e for e in await store.events() if e.kind is EventKind.WARNING]
    assert len(warned) == 1 and "unreachable" in warned[0].message
    assert [w for w in store.warnings if "unreachable" in w] == [warned[0].message]
    assert redis_server.url.split("/")[2] in warned[0].message

    await asyncio.to_thread(redis_server.start)  # back, and empty: no persistence
    await until(lambda: store.redis_up, 5, "the store seeing redis back")
    other = await observe(redis_server)
    try:
        assert [r.endpoint for r in await other.backends()] == [EP, EP6]
        assert await other.coordinator() == coordinator()
        assert await other.live_nodes() == [reg]
        kinds = [e.kind for e in await other.events()]
        assert kinds == [
            EventKind.WARNING,
            EventKind.COORDINATOR_RESTARTED,
            EventKind.STORE_CAUGHT_UP,
        ]

        # Reads come from Redis again ...
        await other.put_backends([backend(OTHER, last_seen=time.time())])

        async def read_from_redis() -> bool:
            return OTHER in [r.endpoint for r in await store.backends()]

        # Waited for: on a loaded machine one read may time out (1 s), which the store rightly
        # takes as Redis gone; it then catches up and reads from Redis again.
        await until(read_from_redis, 10, "the other machine's backend read from redis")
        # ... and other machines' changes reach our subscribers, once the remote subscription
        # is back (within a retry period). Their event is theirs alone: no local echo matches.
        theirs = Event(EventKind.WARNING, "from another machine", None, time.time())

        async def heard_theirs() -> bool:
            await other.add_event(theirs)
            try:
                await asyncio.wait_for(
                    hear(sub, lambda c: c.event == theirs, "the other machine's event"), 0.5
                )
            except TimeoutError:
                return False
            return True

        await until(heard_theirs, 10, "another machine's change reaching our subscriber")
    finally:
        await other.close()


async def test_catch_up_applies_removals_and_keeps_newer_remote_records(
    resilient: ResilientStore, redis_server: RedisServer
) -> None:
    store, t0 = resilient, time.time()
    await store.put_backends([backend(EP, last_seen=t0), backend(EP6, last_seen=t0)])
    other = await observe(redis_server)
    await other.put_backends([backend(OTHER, last_seen=t0 + 100, version="theirs")])
    await other.close()
    raw = Redis.from_url(redis_server.url)
    await raw.save()  # this time Redis comes back with what it had before the outage
    await raw.aclose()

    await asyncio.to_thread(redis_server.stop)
    await store.remove_backend(EP6)
    await store.put_backends([backend(EP, last_seen=t0 + 10, version="ours")])
    await store.put_backends([backend(OTHER, last_seen=t0 + 50, version="ours, older")])
    await asyncio.to_thread(redis_server.start)
    await until(lambda: store.redis_up, 5, "the store seeing redis back")

    other = await observe(redis_server)
    try:
        view = {r.endpoint: r.version for r in await other.backends()}
        assert view == {EP: "ours", OTHER: "theirs"}  # EP6 removed; the newer remote kept
    finally:
        await other.close()


async def test_catch_up_does_not_trust_clocks_that_differ(
    resilient: ResilientStore, redis_server: RedisServer
) -> None:
    """Our clock runs 500 s ahead of the other machine's; theirs wrote last. Catch-up must not
    push our old record over theirs for looking newer, nor drop the event we recorded during
    the outage because theirs carries a later time."""
    store, t0 = resilient, time.time()
    await store.put_backends([backend(OTHER, last_seen=t0 + 500, version="ours, earlier")])
    other = await observe(redis_server)
    await other.put_backends([backend(OTHER, last_seen=t0 + 1, version="theirs, later")])
    ahead = Event(EventKind.WARNING, "from a machine whose clock is ahead", None, t0 + 1000)
    await other.add_event(ahead)
    await other.close()
    raw = Redis.from_url(redis_server.url)
    await raw.save()  # Redis comes back with what it had before the outage
    await raw.aclose()

    await asyncio.to_thread(redis_server.stop)
    during = Event(EventKind.COORDINATOR_RESTARTED, "restarted during the outage", EP, t0 + 2)
    await store.add_event(during)
    await store.put_backends([backend(EP, last_seen=t0 + 2, version="ours, during")])
    await asyncio.to_thread(redis_server.start)
    await until(lambda: store.redis_up, 5, "the store seeing redis back")

    other = await observe(redis_server)
    try:
        view = {r.endpoint: r.version for r in await other.backends()}
        assert view == {OTHER: "theirs, later", EP: "ours, during"}
        messages = [e.message for e in await other.events(100)]
        assert "restarted during the outage" in messages, messages
        assert ahead.message in messages
    finally:
        await other.close()


async def test_redis_down_at_start_then_up(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")  # not started: nothing listens on its port
    store = await open_store(server.url, tmp_path, environ={}, retry_s=0.1)
    try:
        assert isinstance(store, ResilientStore) and not store.redis_up
        assert "unreachable" in store.warnings[0]
        await store.put_backends([backend(EP, last_seen=time.time())])
        assert [r.endpoint for r in await store.backends()] == [EP]
        await asyncio.to_thread(server.start)
        await until(lambda: store.redis_up, 5, "the store seeing redis back")
        other = await observe(server)
        assert [r.endpoint for r in await other.backends()] == [EP]
        await other.close()
    finally:
        await store.close()
        server.stop()


async def test_restart_shows_last_view_at_once_stale(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    first = await open_store(redis_server.url, tmp_path, environ={}, retry_s=0.1)
    await first.put_backends([backend(EP, last_seen=time.time())])
    await first.close()
    again = await open_store(redis_server.url, tmp_path, environ={}, retry_s=0.1)
    try:
        [rec] = await again.backends()
        assert rec.endpoint == EP and rec.stale
    finally:
        await again.close()


# --- the factory --------------------------------------------------------------------------


def test_redis_url_precedence() -> None:
    env = {"CORRAL_REDIS_URL": "redis://a:1", "SOLLOL_REDIS_URL": "redis://b:2"}
    assert redis_url_from("redis://flag:3", env) == "redis://flag:3"
    assert redis_url_from(None, env) == "redis://a:1"
    assert redis_url_from(None, {"SOLLOL_REDIS_URL": "redis://b:2"}) == "redis://b:2"
    assert redis_url_from(None, {"CORRAL_REDIS_URL": " "}) is None
    assert redis_url_from(None, {}) is None


async def test_open_store_picks_the_implementation(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    embedded: Store = await open_store(None, tmp_path / "a", environ={})
    assert isinstance(embedded, EmbeddedStore)
    assert (tmp_path / "a" / "state.db").exists()
    await embedded.close()

    legacy = await open_store(None, tmp_path / "b", environ={"SOLLOL_REDIS_URL": redis_server.url})
    assert isinstance(legacy, ResilientStore) and legacy.redis_up
    await legacy.put_backends([replace(backend(), last_seen=time.time())])
    other = await observe(redis_server)
    assert [r.endpoint for r in await other.backends()] == [EP]
    await other.close()
    await legacy.close()

    with pytest.raises(ValueError, match=r"\*\*\*") as info:
        await open_store("http://user:secret@host:1", tmp_path / "c", environ={})
    assert "secret" not in str(info.value)
