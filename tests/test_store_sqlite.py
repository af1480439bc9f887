"""The embedded store: restart persistence, corrupted files, poisoned rows, a free event loop."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.store import codec
from corral.store.sqlite import EmbeddedStore
from corral.types import Status
from tests.test_store_codec import EP, EP6, backend, coordinator, event, node

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
    store = await EmbeddedStore.open(tmp_path / "state.db")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    slow = (
        "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 2000000) "
        "SELECT count(*) FROM r"
    )
    started = time.monotonic()
    await store._call(lambda conn: conn.execute(slow).fetchone())
    elapsed = time.monotonic() - started
    ticker.cancel()
    await store.close()
    assert elapsed > 0.05, "the query was meant to be slow"
    assert ticks >= elapsed / 0.005 / 4  # the loop kept running while SQLite worked


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
