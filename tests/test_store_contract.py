"""What every store promises, run against each: the embedded SQLite file and a real Redis.

Records round-trip; an upsert keeps first_seen; poison is never written; a node is live until
three heartbeats have passed since its last one (by the store's clock, which the tests hold);
events are bounded, most recent last; subscribers hear each change; a view written before a
store was opened reads as stale until written again.
"""

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
from corral.store.base import Change, Event, EventKind, NodeRegistration, Store
from corral.store.redis import RedisStore
from corral.store.sqlite import EmbeddedStore
from tests.support.clock import FakeClock
from tests.support.records import EP, EP6, backend, coordinator, event, node
from tests.support.redis_server import RedisServer

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
    assert store.take_warnings() == []


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


# Long heartbeats: Redis counts a key's TTL down in real time, so "still live" must leave it
# minutes, not milliseconds. The store's clock (held still here) says how old each beat is.
BEAT = 1000.0


async def test_a_node_is_live_until_three_heartbeats_have_passed(make_store: MakeStore) -> None:
    clock = FakeClock()
    store = await make_store(clock=clock)

    def beat(age: float) -> NodeRegistration:
        return node(heartbeat_s=BEAT, last_heartbeat=clock() - age)

    await store.register_node(beat(3 * BEAT - 10))  # two beats missed, and then some: live
    assert [r.node_id for r in await store.live_nodes()] == [node().node_id]
    await store.register_node(beat(3 * BEAT))  # the third missed: gone
    assert await store.live_nodes() == []
    # A beat stamped ahead of the store's clock (the node's clock runs fast) counts from now.
    await store.register_node(beat(-10 * BEAT))
    [reg] = await store.live_nodes()
    assert reg.last_heartbeat == clock() + 10 * BEAT  # kept as sent; only its expiry is capped


async def test_unregister_removes_at_once(make_store: MakeStore) -> None:
    store = await make_store()
    await store.register_node(node(last_heartbeat=time.time(), heartbeat_s=BEAT))
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
    clock = FakeClock()
    first = await make_store(clock=clock)
    await first.put_backends([backend()])
    clock.advance(1.0)
    second = await make_store(clock=clock)  # another run (or machine) opened after that write
    [seen] = await second.backends()
    assert seen.stale and seen == replace(backend(), stale=True)
    await second.put_backends([backend()])
    [seen] = await second.backends()
    assert not seen.stale
