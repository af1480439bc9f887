"""EmbeddedStore, the default: one SQLite file under the state directory, no server.

All SQLite work runs on one worker thread that owns the connection, so nothing blocks the event
loop. Rows hold codec JSON and are read back through the same strict codec as Redis values. A
file SQLite cannot read is moved aside (`*.corrupt-<time>`) and the store starts fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from corral.endpoint import Endpoint
from corral.store import codec
from corral.store.base import (
    MAX_EVENTS,
    MISSED_BEATS,
    BackendRecord,
    Change,
    CoordinatorRecord,
    Event,
    NodeRegistration,
)
from corral.store.hub import Hub, QueueSubscription
from corral.store.warn import Warnings

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, expires_at REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS backends (endpoint TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS coordinator (id INTEGER PRIMARY KEY CHECK (id = 0), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
"""
OPEN_DEADLINE_S = 10.0  # longest wait for other processes to let go of a database being opened
_MAX_TTL_S = 86400 * MISSED_BEATS  # the codec's longest heartbeat, three times

T = TypeVar("T")


class _Unusable(Exception):
    """The file opened but cannot be used as this store (failed check, newer schema)."""


def _primary_code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF  # extended codes keep it low


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_corrupt(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class EmbeddedStore:
    def __init__(
        self,
        path: Path,
        *,
        max_events: int = MAX_EVENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._warnings = Warnings()
        self.max_events = max_events
        self._clock = clock  # wall-clock time: TTLs, staleness; tests pass their own
        self.opened_at = clock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="corral-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._thread_warnings: deque[str] = deque()  # written by the worker, drained by the loop
        self._hub = Hub()
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, *, max_events: int = MAX_EVENTS, clock: Callable[[], float] = time.time
    ) -> EmbeddedStore:
        store = cls(path, max_events=max_events, clock=clock)
        await store._call(lambda conn: None)
        return store

    @property
    def warnings(self) -> list[str]:
        """The warnings not yet taken (a copy)."""
        return self._warnings.peek()

    def take_warnings(self) -> list[str]:
        return self._warnings.take()

    def shared_reachable(self) -> bool | None:
        return None

    # --- the worker thread ------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError(f"{self.path}: store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, fn)
        finally:
            while self._thread_warnings:
                self._warnings.add(self._thread_warnings.popleft())

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._db())
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            self._set_aside(f"database became unreadable ({exc})")
            return fn(self._db())

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn = self._connect()
            except (sqlite3.DatabaseError, _Unusable) as exc:
                if isinstance(exc, sqlite3.DatabaseError) and not _is_corrupt(exc):
                    raise OSError(f"{self.path}: cannot open the state database: {exc}") from exc
                self._set_aside(str(exc))
                self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        # Two processes opening a new file at once can deadlock on the switch to WAL (both hold
        # a read lock, both want to write); SQLite then fails one at once without waiting, so
        # the open is retried until the deadline instead of failing the command.
        deadline = time.monotonic() + OPEN_DEADLINE_S
        while True:
            try:
                return self._connect_once()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(random.uniform(0.01, 0.05))  # on the worker thread, never the loop

    def _connect_once(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise _Unusable(f"integrity check failed: {'; '.join(problems[:3])}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise _Unusable(f"schema version {version} is newer than this Corral's")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_aside(self, why: str) -> None:
        """Keep the bad file for inspection; the store carries on with a fresh one."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        for suffix in ("", "-wal", "-shm"):
            src = self.path.with_name(self.path.name + suffix)
            if src.exists():
                src.replace(target.with_name(target.name + suffix))
        self._thread_warnings.append(
            f"{self.path}: {why}; moved aside to {target.name}, starting with an empty state"
        )

    def _where(self, table: str, key: object) -> str:
        return f"{self.path.name} table {table} row {codec.show(key)}"

    # --- nodes --------------------------------------------------------------------------------

    async def register_node(self, reg: NodeRegistration) -> None:
        body = codec.dumps(codec.node_to_json(reg), f"node {reg.node_id!r}")
        # A clock ahead of ours must not keep a registration alive longer than its TTL.
        expires_at = min(reg.last_heartbeat, self._clock()) + reg.ttl_s

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO nodes (node_id, expires_at, body) VALUES (?, ?, ?)",
                (reg.node_id, expires_at, body),
            )

        await self._call(write)
        self._hub.publish(Change("nodes"))

    async def unregister_node(self, node_id: str) -> None:
        codec.check_node_id(node_id, "unregister_node")
        await self._call(lambda c: c.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)))
        self._hub.publish(Change("nodes"))

    async def live_nodes(self) -> list[NodeRegistration]:
        def read(conn: sqlite3.Connection) -> list[NodeRegistration]:
            now = self._clock()
            with _tx(conn):
                conn.execute("DELETE FROM nodes WHERE expires_at <= ?", (now,))
                rows = conn.execute(
                    "SELECT node_id, body FROM nodes WHERE expires_at <= ? ORDER BY node_id",
                    (now + _MAX_TTL_S,),
                ).fetchall()
            out = []
            for key, body in rows:
                where = self._where("nodes", key)
                try:
                    reg = codec.stored_node(body, where, key)
                except codec.CodecError as exc:
                    self._thread_warnings.append(f"{exc}; dropped")
                    continue
                out.append(reg)
            return out

        return await self._call(read)

    # --- backends -----------------------------------------------------------------------------

    async def put_backends(self, records: list[BackendRecord]) -> None:
        if not records:
            return
        now = self._clock()
        bodies = {
            codec.endpoint_key(r.endpoint): codec.backend_to_json(r, written_at=now)
            for r in records
        }

        def write(conn: sqlite3.Connection) -> None:
            with _tx(conn):
                for key, body in bodies.items():
                    row = conn.execute(
                        "SELECT body FROM backends WHERE endpoint = ?", (key,)
                    ).fetchone()
                    if row is not None:
                        with contextlib.suppress(codec.CodecError):  # a bad row is replaced
                            old = codec.decode(row[0], key, codec.backend_from_json)
                            body["first_seen"] = min(old.first_seen, body["first_seen"])
                    conn.execute(
                        "INSERT OR REPLACE INTO backends (endpoint, body) VALUES (?, ?)",
                        (key, codec.dumps(body, key)),
                    )

        await self._call(write)
        self._hub.publish(Change("backends"))

    async def remove_backend(self, endpoint: Endpoint) -> None:
        key = codec.endpoint_key(endpoint)
        await self._call(lambda c: c.execute("DELETE FROM backends WHERE endpoint = ?", (key,)))
        self._hub.publish(Change("backends"))

    async def backends(self) -> list[BackendRecord]:
        def read(conn: sqlite3.Connection) -> list[BackendRecord]:
            rows = conn.execute("SELECT endpoint, body FROM backends ORDER BY endpoint").fetchall()
            out = []
            for key, body in rows:
                where = self._where("backends", key)
                try:
                    rec = codec.stored_backend(body, where, key, self.opened_at)
                except codec.CodecError as exc:
                    self._thread_warnings.append(f"{exc}; dropped")
                    continue
                out.append(rec)
            return out

        return await self._call(read)

    # --- coordinator --------------------------------------------------------------------------

    async def set_coordinator(self, record: CoordinatorRecord) -> None:
        body = codec.dumps(codec.coordinator_to_json(record), "coordinator")
        await self._call(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO coordinator (id, body) VALUES (0, ?)", (body,)
            )
        )
        self._hub.publish(Change("coordinator"))

    async def coordinator(self) -> CoordinatorRecord | None:
        def read(conn: sqlite3.Connection) -> CoordinatorRecord | None:
            row = conn.execute("SELECT body FROM coordinator WHERE id = 0").fetchone()
            if row is None:
                return None
            try:
                return codec.decode(
                    row[0], self._where("coordinator", 0), codec.coordinator_from_json
                )
            except codec.CodecError as exc:
                self._thread_warnings.append(f"{exc}; dropped")
                return None

        return await self._call(read)

    # --- events -------------------------------------------------------------------------------

    async def add_event(self, event: Event) -> None:
        await self.add_events([event])

    async def add_events(self, events: list[Event]) -> None:
        bodies = [codec.dumps(codec.event_to_json(e), f"event {e.kind}") for e in events]

        def write(conn: sqlite3.Connection) -> None:
            with _tx(conn):
                conn.executemany("INSERT INTO events (body) VALUES (?)", [(b,) for b in bodies])
                conn.execute(
                    "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                    (self.max_events,),
                )

        await self._call(write)
        for event in events:
            self._hub.publish(Change("events", event))

    async def events(self, limit: int = 100) -> list[Event]:
        def read(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT id, body FROM events ORDER BY id DESC LIMIT ?",
                (max(0, min(limit, self.max_events)),),
            ).fetchall()
            out = []
            for key, body in reversed(rows):
                try:
                    out.append(
                        codec.decode(body, self._where("events", key), codec.event_from_json)
                    )
                except codec.CodecError as exc:
                    self._thread_warnings.append(f"{exc}; dropped")
            return out

        return await self._call(read)

    # --- the rest -----------------------------------------------------------------------------

    async def legacy_backends(self) -> list[Endpoint]:
        return []  # the older design kept its list in Redis only

    def notify(self, change: Change) -> None:
        """Tell this process's subscribers (used when a shared store changed under us)."""
        self._hub.publish(change)

    async def subscribe(self) -> QueueSubscription:
        return self._hub.subscribe()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._shut)
        self._pool.shutdown(wait=False)

    def _shut(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
