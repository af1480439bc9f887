"""The embedded store: restart persistence, corrupted files, poisoned rows, a free event loop.

Also: a node expires exactly three heartbeats after its last one, by the store's clock (held by
the test), and warnings are delivered once to whoever takes them.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.store import codec
from corral.store.sqlite import EmbeddedStore
from corral.types import Status
from tests.support.clock import FakeClock
from tests.support.records import EP, EP6, backend, coordinator, event, node

pytestmark = pytest.mark.timeout(30)  # bounded even when something hangs


def aside(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("state.db.corrupt-*"))


async def test_restart_shows_the_last_view_at_once_marked_stale(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await EmbeddedStore.open(path)
    await store.put_backends([backend(), backend(EP6, status=Status.READY)])
    await store.set_coordinator(coordinator())
    await store.add_event(event())
    assert not any(r.stale for r in await store.backends())
    await store.close()

    reopened = await EmbeddedStore.open(path)
    try:
        view = await reopened.backends()
        assert view == [
            replace(backend(), stale=True),
            replace(backend(EP6, status=Status.READY), stale=True),
        ]
        assert await reopened.coordinator() == coordinator()
        assert await reopened.events() == [event()]
        await reopened.put_backends([backend()])  # re-verified
        assert [r.stale for r in await reopened.backends()] == [False, True]
        assert reopened.warnings == []
    finally:
        await reopened.close()


async def test_garbage_file_is_moved_aside_and_the_store_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await EmbeddedStore.open(path)
    await store.put_backends([backend()])
    await store.close()
    garbage = os.urandom(16384)
    path.write_bytes(garbage)
    neighbour = tmp_path / "node-id-10.1.2.3-50052"  # something else in the state directory
    neighbour.write_text("keep me\n")

    store = await EmbeddedStore.open(path)  # no exception
    try:
        [moved] = aside(tmp_path)
        assert moved.read_bytes() == garbage  # preserved for inspection
        [warning] = store.warnings
        assert str(path) in warning and "not a database" in warning and moved.name in warning
        assert await store.backends() == []
        await store.put_backends([backend()])  # and it works
        assert [r.endpoint for r in await store.backends()] == [EP]
        assert neighbour.read_text() == "keep me\n"
    finally:
        await store.close()


async def test_damaged_pages_are_caught_at_open(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await EmbeddedStore.open(path)
    many = [backend(Endpoint(f"10.9.{i // 250}.{i % 250 + 1}", 50052)) for i in range(300)]
    await store.put_backends(many)
    await store.close()
    data = bytearray(path.read_bytes())
    data[8192:16384] = os.urandom(8192)  # the header survives, the pages do not
    path.write_bytes(bytes(data))

    store = await EmbeddedStore.open(path)
    try:
        assert len(aside(tmp_path)) == 1
        assert "moved aside" in store.warnings[0]
        assert await store.backends() == []
    finally:
        await store.close()


async def test_a_newer_schema_is_set_aside_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    store = await EmbeddedStore.open(path)
    try:
        assert "schema version 99" in store.warnings[0]
        assert len(aside(tmp_path)) == 1
        await store.put_backends([backend()])
        assert len(await store.backends()) == 1
    finally:
        await store.close()


async def test_poisoned_rows_are_dropped_with_warnings_good_rows_survive(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await EmbeddedStore.open(path)
    await store.put_backends([backend()])
    await store.add_event(event())
    await store.register_node(node(last_heartbeat=time.time(), heartbeat_s=30))
    good = codec.backend_to_json(backend(), written_at=time.time())
    poison = {
        "coordinator:0": codec.dumps({**good, "endpoint": "coordinator:0"}, "t"),
        "10.0.0.7:0": codec.dumps({**good, "endpoint": "10.0.0.7:0"}, "t"),
        "junk": "{definitely not json",
        "types": codec.dumps({**good, "status": 7, "devices": "many"}, "t"),
        "huge": '"' + "x" * (1 << 20) + '"',
        "10.0.0.8:50052": codec.dumps(good, "t"),  # key and body disagree
    }
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO backends VALUES (?, ?)", list(poison.items()))
        conn.execute("INSERT INTO events (body) VALUES ('[1,2')")
        conn.execute("INSERT INTO nodes VALUES ('ghost', ?, '{}')", (time.time() + 60,))
        conn.execute("INSERT OR REPLACE INTO coordinator VALUES (0, '{\"state\": 5}')")
    conn.close()

    assert [r.endpoint for r in await store.backends()] == [EP]
    assert await store.events() == [event()]
    assert [r.node_id for r in await store.live_nodes()] == [node().node_id]
    assert await store.coordinator() is None
    text = "\n".join(store.warnings)
    for key in poison:
        assert f"row {key!r}" in text
    assert "placeholder host" in text and "port 0" in text and "not JSON" in text
    assert "larger than" in text and "field 'status'" in text and "holds backend" in text
    assert "table events" in text and "table nodes" in text and "table coordinator" in text
    assert all(w.endswith("dropped") for w in store.warnings)
    await store.close()


async def test_sqlite_work_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """The store's SQLite work waits on something only the event loop can do: were it run on
    the loop, the loop could never do it, and the work would give up."""
    store = await EmbeddedStore.open(tmp_path / "state.db")
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    gate = threading.Event()

    def work(conn: sqlite3.Connection) -> bool:
        loop.call_soon_threadsafe(started.set_result, None)
        return gate.wait(10)  # False: nobody opened it

    async def open_gate() -> None:
        await started
        gate.set()

    opener = asyncio.ensure_future(open_gate())
    try:
        assert await store._call(work), "the store's work ran on the event loop and blocked it"
    finally:
        opener.cancel()
        await store.close()


async def test_a_node_expires_three_heartbeats_after_its_last_one(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await EmbeddedStore.open(tmp_path / "state.db", clock=clock)
    try:
        await store.register_node(node(heartbeat_s=0.5, last_heartbeat=clock()))
        clock.advance(1.5 - 0.001)
        assert [r.node_id for r in await store.live_nodes()] == [node().node_id]
        clock.advance(0.001)  # exactly three heartbeats since the last
        assert await store.live_nodes() == []
        # A heartbeat stamped later than now (a clock ahead of ours) expires as if sent now.
        await store.register_node(node(heartbeat_s=0.5, last_heartbeat=clock() + 60))
        clock.advance(1.5)
        assert await store.live_nodes() == []
    finally:
        await store.close()


async def test_processes_opening_a_new_database_at_once_all_get_it(tmp_path: Path) -> None:
    # `coordinator run` and `coordinator status` may open a fresh state file in the same moment.
    # Each store has its own worker thread and connection, as separate processes do; before the
    # open retried, about one round in fifteen failed with "database is locked".
    for round_no in range(60):
        path = tmp_path / f"round{round_no}" / "state.db"
        stores = await asyncio.gather(*(EmbeddedStore.open(path) for _ in range(4)))
        try:
            await stores[0].put_backends([backend(EP)])
            for store in stores:
                assert [b.endpoint for b in await store.backends()] == [EP]
        finally:
            for store in stores:
                await store.close()


async def test_warnings_are_delivered_once_to_the_caller_that_takes_them(tmp_path: Path) -> None:
    """Two consumers (the registry and cache sources, say) never both show one warning, and a
    warning taken is gone: nothing to clear by hand in a shared list."""
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database")
    store = await EmbeddedStore.open(path)
    try:
        first = store.take_warnings()
        assert len(first) == 1 and "moved aside" in first[0]
        assert store.take_warnings() == []
        assert store.shared_reachable() is None and await store.legacy_backends() == []
    finally:
        await store.close()
