"""Redis outages with a real server stopped and restarted; the factory's choice of store."""

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
from tests.redis_server import RedisServer
from tests.redis_server import redis_server as redis_server  # fixture
from tests.test_store_codec import EP, EP6, backend, coordinator, node

pytestmark = pytest.mark.timeout(30)  # bounded even when something hangs

OTHER = Endpoint("10.7.7.7", 50052)


async def eventually(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def drain(sub: Subscription, seconds: float = 2.0) -> list[Change]:
    """What arrives until 0.2 s of quiet (at most `seconds`, so a chatty bug cannot hang us)."""
    got: list[Change] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(await asyncio.wait_for(anext(sub), 0.2))
        except TimeoutError:
            break
    return got


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
    resilient: ResilientStore, redis_server: RedisServer
) -> None:
    store = resilient
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
    assert Change("coordinator") in await drain(sub)  # local subscribers still hear changes

    await asyncio.sleep(0.4)  # several monitor rounds against a dead server
    warned = [e for e in await store.events() if e.kind is EventKind.WARNING]
    assert len(warned) == 1 and "unreachable" in warned[0].message
    assert [w for w in store.warnings if "unreachable" in w] == [warned[0].message]
    assert redis_server.url.split("/")[2] in warned[0].message

    await asyncio.to_thread(redis_server.start)  # back, and empty: no persistence
    await eventually(lambda: store.redis_up)
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

        # Reads come from Redis again, and other machines' changes reach our subscribers.
        await drain(sub)
        await other.put_backends([backend(OTHER, last_seen=time.time())])
        assert OTHER in [r.endpoint for r in await store.backends()]
        heard: list[Change] = []
        for _ in range(20):  # the remote subscription comes back within a retry period
            await other.put_backends([backend(OTHER, last_seen=time.time())])
            heard = await drain(sub)
            if heard:
                break
        assert Change("backends") in heard
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
    await eventually(lambda: store.redis_up)

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
    await eventually(lambda: store.redis_up)

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
        await eventually(lambda: store.redis_up)
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
