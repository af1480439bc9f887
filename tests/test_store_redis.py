"""The Redis store against a real redis-server: poisoned keys, TTLs, legacy metadata, pub/sub.

Poison and keys of the wrong type are dropped with a warning and never fatal; every key is under
the prefix and has a TTL (a node's counted from its last heartbeat, by the store's clock); the
legacy metadata goes through the endpoint gate; other instances hear changes; a server that is
gone raises at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, FieldT

from corral.endpoint import Endpoint
from corral.store import codec
from corral.store.base import Change, Event, EventKind
from corral.store.redis import LEGACY_KEY, RedisStore
from tests.support.clock import FakeClock
from tests.support.records import EP, backend, coordinator, event, node
from tests.support.redis_server import RedisServer
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(30)  # bounded even when something hangs


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client for planting what a careless or hostile writer could leave in Redis."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_server.url)
    yield s
    await s.close()


async def test_poisoned_keys_are_dropped_with_warnings_good_entries_survive(
    store: RedisStore, raw: Redis
) -> None:
    await store.put_backends([backend()])
    await store.add_event(event())
    await store.register_node(node(last_heartbeat=time.time(), heartbeat_s=30))
    good = codec.backend_to_json(backend(), written_at=time.time())
    poison: dict[FieldT, EncodableT] = {
        "coordinator:0": json.dumps({**good, "endpoint": "coordinator:0"}),
        "10.0.0.7:0": json.dumps({**good, "endpoint": "10.0.0.7:0"}),
        "junk": "{not json",
        "types": json.dumps({**good, "endpoint": 50052, "in_use": "yes"}),
        "huge": "x" * (1 << 20),
        "10.0.0.8:50052": json.dumps(good),  # the field and the record disagree
    }
    await raw.hset("corral:backends", mapping=poison)
    await raw.rpush("corral:events", "[broken", json.dumps({"kind": "nope", "message": "m"}))
    await raw.set("corral:node:ghost", json.dumps({"node_id": "ghost", "endpoint": "host:0"}))
    await raw.hset("corral:node:wrongtype", "a", "b")
    await raw.set("corral:coordinator", json.dumps({"state": "serving", "backends": ["[::]:1"]}))

    assert [r.endpoint for r in await store.backends()] == [EP]
    assert await store.events() == [event()]
    assert [r.node_id for r in await store.live_nodes()] == [node().node_id]
    assert await store.coordinator() is None

    text = "\n".join(store.warnings)
    for field in poison:
        assert f"key corral:backends field {field!r}" in text
    assert "placeholder host" in text and "port 0" in text and "not JSON" in text
    assert "larger than" in text and "expected a 'host:port' string" in text
    assert "key corral:events" in text and "not an event kind" in text
    assert "key corral:node:ghost" in text and "key corral:node:wrongtype" in text
    assert "key corral:coordinator" in text and "unspecified address" in text
    assert all(w.startswith(f"redis {store.url} key") for w in store.warnings)


async def test_keys_of_the_wrong_type_are_reported_not_fatal(store: RedisStore, raw: Redis) -> None:
    await raw.set("corral:backends", "a string, not a hash")
    await raw.set("corral:events", "not a list")
    await raw.rpush("corral:coordinator", "not a string")
    assert await store.backends() == []
    assert await store.events() == []
    assert await store.coordinator() is None
    assert len(store.warnings) == 3
    # Our own keys: a planted type is replaced on the next write, with a warning.
    await store.put_backends([backend()])
    await store.add_event(event())
    assert [r.endpoint for r in await store.backends()] == [EP]
    assert await store.events() == [event()]
    assert sum("replaced" in w for w in store.warnings) == 2


async def test_every_key_is_under_the_prefix_and_expires(
    redis_server: RedisServer, raw: Redis
) -> None:
    clock = FakeClock()
    store = RedisStore(redis_server.url, clock=clock)
    beat = 100.0
    node_key = f"corral:node:{node().node_id}"
    try:
        # Its last heartbeat was two beats ago: one more beat and it is gone.
        await store.register_node(node(heartbeat_s=beat, last_heartbeat=clock() - 2 * beat))
        await store.put_backends([backend()])
        await store.set_coordinator(coordinator())
        await store.add_event(event())
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await raw.keys("*"))
        assert keys == ["corral:backends", "corral:coordinator", "corral:events", node_key]
        for key in keys:
            assert await raw.pttl(key) > 0, key
        # The TTL counts from the last heartbeat, not from the write: one beat is left.
        assert 0 < await raw.pttl(node_key) <= beat * 1000
        # And Redis drops the key by itself when it runs out: nobody has to clean up ghosts.
        await store.register_node(node(heartbeat_s=0.1, last_heartbeat=clock() - 0.25))
        await until(lambda: _gone(raw, node_key), 5, f"{node_key} expiring")
    finally:
        await store.close()


async def _gone(raw: Redis, key: str) -> bool:
    return not await raw.exists(key)


async def test_legacy_metadata_through_the_gate(store: RedisStore, raw: Redis) -> None:
    assert await store.legacy_backends() == []  # absent: nothing, and nothing to warn about
    meta = {
        "nodes": [],
        "rpc_backends": [
            {"host": "10.0.0.1", "port": 50052},
            "10.0.0.2:50053",
            {"host": "coordinator", "port": 0},
            "0.0.0.0:50052",
        ],
        "metrics": {},
    }
    await raw.set(LEGACY_KEY, json.dumps(meta), ex=3600)
    assert await store.legacy_backends() == [
        Endpoint("10.0.0.1", 50052),
        Endpoint("10.0.0.2", 50053),
    ]
    assert len(store.warnings) == 2
    assert all(f"key {LEGACY_KEY}: rpc_backends[" in w for w in store.warnings)

    store.take_warnings()
    await raw.set(LEGACY_KEY, "{junk")
    assert await store.legacy_backends() == []
    assert "not JSON" in store.warnings[0]

    store.take_warnings()
    await raw.delete(LEGACY_KEY)
    await raw.rpush(LEGACY_KEY, "x")
    assert await store.legacy_backends() == []
    assert "not a string" in store.warnings[0]


async def test_another_instance_hears_changes_and_junk_is_dropped(
    redis_server: RedisServer, store: RedisStore, raw: Redis
) -> None:
    listener = RedisStore(redis_server.url)
    try:
        sub = await listener.subscribe()
        await raw.publish("corral:changes", "junk on the channel")
        ev = Event(EventKind.BACKEND_APPEARED, "new backend", EP, 5.0)
        await store.add_event(ev)
        await store.put_backends([backend()])
        assert await asyncio.wait_for(anext(sub), 3) == Change("events", ev)
        assert await asyncio.wait_for(anext(sub), 3) == Change("backends")
        assert "channel corral:changes" in listener.warnings[0]

        # A store can skip its own echoes (the resilient store hears those locally).
        own = await store.subscribe(skip_origin=store.origin)
        await store.put_backends([backend()])
        await listener.put_backends([backend()])
        assert await asyncio.wait_for(anext(own), 3) == Change("backends")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(own), 0.3)
    finally:
        await listener.close()


async def test_an_unreachable_server_raises_promptly(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout_s=0.5)
    await store.ping()
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(RedisConnectionError) as info:
        await store.backends()
    assert time.monotonic() - started < 1.0  # no hidden retry with backoff
    assert str(redis_server.port) in str(info.value) or "closed" in str(info.value)
    await store.close()
