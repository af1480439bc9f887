"""What both stores promise, run against each: the embedded SQLite file and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from corral.endpoint import Endpoint
from corral.store import codec
from corral.store.base import Change, Event, EventKind, Store
from corral.store.redis import RedisStore
from corral.store.sqlite import EmbeddedStore
from tests.redis_server import RedisServer
from tests.redis_server import redis_server as redis_server  # fixture
from tests.test_store_codec import EP, EP6, backend, coordinator, event, node

pytestmark = pytest.mark.timeout(30)  # bounded even when something hangs

MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["embedded", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Factory: each call opens another instance on the same underlying state."""
    opened: list[Store] = []
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    async def make(**kw: Any) -> Store:
        store: Store
        if server is not None:
            store = RedisStore(server.url, **kw)
        else:
            store = await EmbeddedStore.open(tmp_path / "state.db", **kw)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_every_record_type_round_trips(make_store: MakeStore) -> None:
    store = await make_store()
    rec, other = backend(), backend(EP6, sources=())
    await store.put_backends([rec, other])
    got = {r.endpoint: r for r in await store.backends()}
    assert got == {EP: rec, EP6: other}

    reg = node(last_heartbeat=time.time(), heartbeat_s=30)
    await store.register_node(reg)
    assert await store.live_nodes() == [reg]

    assert await store.coordinator() is None
    await store.set_coordinator(coordinator())
    assert await store.coordinator() == coordinator()

    evs = [event(), Event(EventKind.COORDINATOR_RESTARTED, "backend lost", None, 1.0)]
    for ev in evs:
        await store.add_event(ev)
    assert await store.events() == evs
    assert store.warnings == []


async def test_upsert_keeps_first_seen_and_remove_forgets(make_store: MakeStore) -> None:
    store = await make_store()
    await store.put_backends([backend(first_seen=100.0, last_seen=100.0)])
    await store.put_backends([backend(first_seen=500.0, last_seen=500.0, version="3.1")])
    [rec] = await store.backends()
    assert (rec.first_seen, rec.last_seen, rec.version) == (100.0, 500.0, "3.1")
    await store.remove_backend(EP)
    assert await store.backends() == []


async def test_poison_is_never_written(make_store: MakeStore) -> None:
    store = await make_store()
    with pytest.raises(codec.CodecError, match="placeholder"):
        await store.put_backends([backend(), backend(Endpoint("coordinator", 0))])
    assert await store.backends() == []  # all or nothing: the batch was refused


async def test_node_gone_after_three_missed_heartbeats(make_store: MakeStore) -> None:
    store = await make_store()
    beat = 0.2
    for _ in range(4):  # heartbeating keeps it alive past one TTL
        await store.register_node(node(heartbeat_s=beat, last_heartbeat=time.time()))
        await asyncio.sleep(beat)
    assert [r.node_id for r in await store.live_nodes()] == [node().node_id]
    # Silence: one missed beat is not enough to drop it ...
    await asyncio.sleep(0.1)
    assert len(await store.live_nodes()) == 1
    # ... three are (TTL = 0.6 s after the last beat, 0.2 s ago), with a little slack.
    await asyncio.sleep(3 * beat - 0.2 + 0.15)
    assert await store.live_nodes() == []


async def test_unregister_removes_at_once(make_store: MakeStore) -> None:
    store = await make_store()
    await store.register_node(node(last_heartbeat=time.time(), heartbeat_s=30))
    await store.unregister_node(node().node_id)
    assert await store.live_nodes() == []


async def test_events_are_bounded_most_recent_last(make_store: MakeStore) -> None:
    store = await make_store(max_events=5)
    for i in range(12):
        await store.add_event(Event(EventKind.WARNING, f"e{i}", ts=float(i)))
    assert [e.message for e in await store.events(100)] == [f"e{i}" for i in range(7, 12)]
    assert [e.message for e in await store.events(2)] == ["e10", "e11"]


async def test_subscribers_hear_each_change(make_store: MakeStore) -> None:
    store = await make_store()
    sub = await store.subscribe()
    await store.put_backends([backend()])
    ev = event()
    await store.add_event(ev)
    await store.set_coordinator(coordinator())
    got = [await asyncio.wait_for(anext(sub), 2) for _ in range(3)]
    assert got == [Change("backends"), Change("events", ev), Change("coordinator")]
    await sub.aclose()
    assert [c async for c in sub] == []  # closed: iteration ends


async def test_a_fresh_put_clears_stale(make_store: MakeStore) -> None:
    first = await make_store()
    await first.put_backends([backend()])
    await asyncio.sleep(0.01)
    second = await make_store()  # another run (or machine) opened after that write
    [seen] = await second.backends()
    assert seen.stale and seen == replace(backend(), stale=True)
    await second.put_backends([backend()])
    [seen] = await second.backends()
    assert not seen.stale
