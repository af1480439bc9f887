"""One state, or a clear stop: an embedded store whose file goes wrong while it is open.

Unlinked, replaced, truncated or overwritten under it: at its next check the store says so once,
puts back at the path what it holds (its backends, live nodes, the coordinator record, recent
events, and what it wrote in between), and another store opening the path reads the same. The
checks' pace is the store's injected clock, moved by hand: nothing here sleeps to let a check
happen. A store opening a file cut short, removed or replaced under another process (one that
does not repair it) leaves that process's -wal and -shm alone and stops with one line after its
wait; a lock held past the wait, the same.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.store import sqlite as sqlite_store
from corral.store.base import BackendRecord, EventKind
from corral.store.errors import StateFileError
from corral.store.sqlite import CHECK_EVERY_S, VERIFY_EVERY_S, EmbeddedStore
from corral.types import Status
from tests.support.clock import FakeClock
from tests.support.records import EP, EP6, backend, coordinator, event, node
from tests.support.state_files import (
    DAMAGES,
    FOREIGN,
    Damage,
    held_open,
    kept_aside,
    write_foreign_database,
)

pytestmark = pytest.mark.timeout(60)

LATE = Endpoint("10.1.2.4", 50052)  # written after the damage, before the store looked


def fresh(records: list[BackendRecord]) -> list[BackendRecord]:
    """Records as compared across stores (each store marks what it did not write as stale)."""
    return [replace(r, stale=False) for r in records]


def file_backends(path: Path) -> list[str]:
    """The endpoints in the file at `path`, read by plain SQLite as any other process would."""
    with closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT endpoint FROM backends ORDER BY 1")]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.name for d in DAMAGES])
async def test_a_damaged_state_file_is_put_back_and_said_once(
    tmp_path: Path, damage: Damage
) -> None:
    path = tmp_path / "state.db"
    wall, pace = FakeClock(), FakeClock(0.0)
    store = await EmbeddedStore.open(path, clock=wall, monotonic=pace)
    other: EmbeddedStore | None = None
    try:
        await store.put_backends([backend(EP), backend(EP6, status=Status.READY)])
        await store.set_coordinator(coordinator())
        await store.register_node(node(heartbeat_s=30, last_heartbeat=wall()))
        await store.add_event(event())

        await damage.do(path)
        await store.put_backends([backend(LATE)])  # before the store looked: wherever it went
        pace.advance(CHECK_EVERY_S)
        view = await store.backends()  # the check runs first: what is read is the file at path

        [warning] = store.take_warnings()
        assert str(path) in warning and damage.says in warning, warning
        assert "(3 backends, 1 live node, the coordinator record, 1 recent event)" in warning
        mine = {EP, EP6, LATE}
        assert mine <= {r.endpoint for r in view}
        if damage.name == "replaced":  # the new file is kept, not overwritten by the old -wal
            assert {r.endpoint for r in view} == mine | {FOREIGN}
        else:
            assert {r.endpoint for r in view} == mine
        assert sorted(file_backends(path)) == sorted(str(r.endpoint) for r in view)

        other = await EmbeddedStore.open(path, clock=wall)  # as another process would
        assert fresh(await other.backends()) == fresh(view)
        assert await other.coordinator() == coordinator()
        assert [n.node_id for n in await other.live_nodes()] == [node().node_id]
        kinds = [e.kind for e in await other.events()]
        assert event() in await other.events() and kinds[-1] is EventKind.WARNING

        # Said once: the file is sound again, and both stores now share it.
        pace.advance(VERIFY_EVERY_S)
        await store.put_backends([backend(EP, status=Status.OFFLINE)])
        assert store.take_warnings() == [] and other.take_warnings() == []
        assert {r.endpoint: r.status for r in await other.backends()}[EP] is Status.OFFLINE
    finally:
        if other is not None:
            await other.close()
        await store.close()


async def test_the_cheap_look_comes_at_its_pace_not_before(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    pace = FakeClock(0.0)
    store = await EmbeddedStore.open(path, monotonic=pace)
    try:
        await store.put_backends([backend(EP)])
        os.unlink(path)
        pace.advance(CHECK_EVERY_S - 0.001)
        await store.put_backends([backend(LATE)])
        assert store.warnings == [] and not path.exists()  # not looked yet
        pace.advance(0.001)
        await store.backends()
        assert len(store.take_warnings()) == 1
        assert file_backends(path) == sorted([str(EP), str(LATE)])
    finally:
        await store.close()


async def test_the_file_is_looked_at_on_its_pace_and_its_pages_on_theirs(tmp_path: Path) -> None:
    """The cheap look (inode, size, header) every CHECK_EVERY_S; damage inside pages, which
    keeps all of that, is found by the page check at VERIFY_EVERY_S."""
    path = tmp_path / "state.db"
    pace = FakeClock(0.0)
    store = await EmbeddedStore.open(path, monotonic=pace)
    try:
        many = [backend(Endpoint(f"10.9.{i // 250}.{i % 250 + 1}", 50052)) for i in range(300)]
        await store.put_backends(many)
        await store._call(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        data = bytearray(path.read_bytes())
        data[20 * 4096 : 30 * 4096] = bytes(10 * 4096)  # pages inside the backends table
        with path.open("r+b") as f:
            f.write(data)

        pace.advance(CHECK_EVERY_S)
        await store.add_event(event())  # header and size fine: nothing to say yet
        assert store.warnings == []
        pace.advance(VERIFY_EVERY_S - CHECK_EVERY_S)
        await store.add_event(event())
        [warning] = store.take_warnings()
        assert "is damaged" in warning and "300 backends" in warning, warning
        assert len(file_backends(path)) == 300
        assert kept_aside(tmp_path)
    finally:
        await store.close()


async def test_check_file_checks_now_and_says_what_it_found(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await EmbeddedStore.open(path, monotonic=FakeClock(0.0))
    try:
        await store.put_backends([backend(EP)])
        assert await store.check_file() is None
        path.unlink()
        assert await store.check_file() == "was removed"
        assert file_backends(path) == [str(EP)]  # already back, before any other operation
        assert len(store.take_warnings()) == 1
    finally:
        await store.close()


async def test_a_file_cut_short_by_a_process_now_gone_is_moved_aside_at_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"")
    path.with_name("state.db-wal").write_bytes(b"left by a process that died")
    store = await EmbeddedStore.open(path)
    try:
        [warning] = store.take_warnings()
        assert "truncated to 0 bytes" in warning and "moved aside" in warning
        assert (tmp_path / warning.split("moved aside to ")[1].split(",")[0]).exists()
        await store.put_backends([backend(EP)])
        assert [r.endpoint for r in await store.backends()] == [EP]
    finally:
        await store.close()


async def test_a_file_cut_short_under_another_process_is_left_to_it_then_a_clear_stop(
    tmp_path: Path,
) -> None:
    """SQLite itself would take the short file for a new database, delete the -wal the other
    process is writing to, and then wait on that process's lock (5 s, retried to 12 s)."""
    path = tmp_path / "state.db"
    async with held_open(path, "truncate") as pid:
        wal = path.with_name("state.db-wal")
        wal_before = wal.stat().st_ino
        start = time.monotonic()
        with pytest.raises(StateFileError) as caught:
            await EmbeddedStore.open(path, damaged_wait_s=0.5)
        took = time.monotonic() - start
        message = str(caught.value)
        assert str(path) in message and f"process {pid}" in message, message
        assert "truncated to 0 bytes" in message and "\n" not in message
        assert 0.5 <= took < 5, took
        assert wal.stat().st_ino == wal_before  # the other process's -wal is untouched
        assert path.stat().st_size == 0 and not kept_aside(tmp_path)


@pytest.mark.parametrize("what", ["removed", "replaced"])
async def test_a_file_gone_from_under_another_process_is_not_opened_with_its_wal(
    tmp_path: Path, what: str
) -> None:
    """Its -wal and -shm are still at the path, in use: SQLite would read that process's index
    for another file and replay its -wal over it. So: wait for that process, then stop."""
    path = tmp_path / "state.db"
    async with held_open(path, "hold") as pid:
        if what == "removed":
            os.unlink(path)
        else:
            write_foreign_database(tmp_path / "other.db")
            os.replace(tmp_path / "other.db", path)
        sides = {s: path.with_name(f"state.db{s}").stat().st_ino for s in ("-wal", "-shm")}
        with pytest.raises(StateFileError) as caught:
            await EmbeddedStore.open(path, damaged_wait_s=0.3)
        message = str(caught.value)
        assert f"{what} while in use" in message and f"process {pid}" in message, message
        assert sides == {s: path.with_name(f"state.db{s}").stat().st_ino for s in sides}


async def test_a_lock_held_past_the_wait_is_a_clear_stop_and_reading_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.3)
    path = tmp_path / "state.db"
    store = await EmbeddedStore.open(path)
    await store.put_backends([backend(EP)])
    await store.close()
    async with held_open(path, "write-lock") as pid:
        store = await EmbeddedStore.open(path)  # opening a set-up database writes nothing
        try:
            assert [r.endpoint for r in await store.backends()] == [EP]
            with pytest.raises(StateFileError) as caught:
                await store.put_backends([backend(EP6)])
            message = str(caught.value)
            assert str(path) in message and f"locked by process {pid}" in message, message
        finally:
            await store.close()
