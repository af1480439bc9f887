"""EmbeddedStore, the default: one SQLite file under the state directory, no server.

All SQLite work runs on one worker thread that owns the connection, so nothing blocks the event
loop. Rows hold codec JSON and are read back through the same strict codec as Redis values. A
file SQLite cannot read is moved aside (`*.corrupt-<time>`) and the store starts fresh.

One state, or a clear stop. While open, the store keeps checking that the file at its path is the
one it has open and still a database, on the worker thread before an operation, and on a timer
when nothing calls:

- every `check_every_s` (2 s): the path's inode against the one opened, its -wal and -shm
  likewise, the file's size, and its first bytes read through SQLite's own descriptor. A stat
  and a 100-byte read: cheap enough at the monitor's own recheck pace, and soon enough that a
  command waiting on a damaged file (`damaged_wait_s`, 5 s) sees it repaired.
- every `verify_every_s` (30 s): PRAGMA quick_check over pages read again from disk (the page
  cache is dropped first, or the check would read the cache and pass). It reads every page and
  leaves the cache cold, hence the slower pace; it finds damage inside pages that keeps the
  size and the header.

On removal, replacement or damage the store says so once (a warning for `take_warnings()`, a
log line, and a warning event), keeps what is bad aside (`*.corrupt-<time>`; the -wal/-shm of a
file that is gone: `*.detached-<time>`), and puts back at the path what it holds in memory:
what it last wrote (`mirror.py`), including what it wrote between the damage and the check
into a file nobody else could see. A damaged file still at the path is swapped for a complete
new one in one rename (another process opening it meanwhile waits, see below), so no process
ever reads the state emptied; a replacement is kept, and written into.

A store being opened never lets SQLite touch a database file cut short next to a -wal (SQLite
would delete the -wal another process is writing to). A damaged file that another process holds
is left to that process to repair, for `damaged_wait_s`; one nobody holds is moved aside. A lock
held past the wait, or a file that cannot be opened, raises StateFileError: one line naming the
file and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    EventKind,
    NodeRegistration,
)
from corral.store.decoded import DecodedRows
from corral.store.errors import StateFileError
from corral.store.hub import Hub, QueueSubscription
from corral.store.mirror import MAX_EVENTS_KEPT, Mirror
from corral.store.sqlite_files import (
    HEADER_SIZE,
    MAGIC,
    SIDE_FILES,
    Ident,
    database_holder,
    has_side_files,
    ident,
    lock_holder,
    read_header,
    shm_holder,
    side_file,
)
from corral.store.warn import Warnings

log = logging.getLogger("corral.store")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, expires_at REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS backends (endpoint TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS coordinator (id INTEGER PRIMARY KEY CHECK (id = 0), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
"""
OPEN_DEADLINE_S = 5.0  # longest wait for other processes to let go of a database being opened
BUSY_TIMEOUT_S = 5.0  # longest wait for another process's lock, per statement
CHECK_EVERY_S = 2.0  # the file's identity and header (see the module's doc)
VERIFY_EVERY_S = 30.0  # its pages (quick_check)
DAMAGED_WAIT_S = 5.0  # how long an opening store waits for another process to repair the file
SETTLE_S = 0.5  # a file cut short that nobody holds is stale once it stays so this long
_MAX_TTL_S = 86400 * MISSED_BEATS  # the codec's longest heartbeat, three times

T = TypeVar("T")


class _Unusable(Exception):
    """The file opened but cannot be used as this store (failed check, newer schema)."""


@dataclass(frozen=True, slots=True)
class _Trouble:
    what: str  # completes "the state file ...", e.g. "was replaced by another file"
    in_place: bool  # the file this store has open is still at the path, its content bad


def _primary_code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF  # extended codes keep it low


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_corrupt(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _who(pid: int | None) -> str:
    return f"process {pid}" if pid is not None and pid > 0 else "another process"


def _nothing(conn: sqlite3.Connection) -> None:
    return None


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
        check_every_s: float = CHECK_EVERY_S,
        verify_every_s: float = VERIFY_EVERY_S,
        damaged_wait_s: float = DAMAGED_WAIT_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._warnings = Warnings()
        self.max_events = max_events
        self._clock = clock  # wall-clock time: TTLs, staleness; tests pass their own
        self.opened_at = clock()
        # The file checks' pace (`monotonic`: tests pass a clock they move by hand).
        self.check_every_s = check_every_s
        self.verify_every_s = verify_every_s
        self.damaged_wait_s = damaged_wait_s
        self._monotonic = monotonic
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="corral-sqlite")
        # Everything below up to the hub is the worker thread's alone.
        self._conn: sqlite3.Connection | None = None
        self._idents: dict[str, Ident | None] = {}  # "" (the database), "-wal", "-shm"
        self._checked_at = 0.0
        self._verified_at = 0.0
        self._mirror = Mirror(min(max_events, MAX_EVENTS_KEPT))
        self._write_back_note: str | None = None  # set: write the mirror back at the next open
        self._thread_warnings: deque[str] = deque()  # written by the worker, drained by the loop
        self._thread_changes: deque[Change] = deque()  # likewise, published by the loop
        self._backends_read: DecodedRows[str, BackendRecord] = DecodedRows()
        self._nodes_read: DecodedRows[str, NodeRegistration] = DecodedRows()
        self._events_read: DecodedRows[int, Event] = DecodedRows()
        self._hub = Hub()
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        max_events: int = MAX_EVENTS,
        clock: Callable[[], float] = time.time,
        check_every_s: float = CHECK_EVERY_S,
        verify_every_s: float = VERIFY_EVERY_S,
        damaged_wait_s: float = DAMAGED_WAIT_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> EmbeddedStore:
        store = cls(
            path,
            max_events=max_events,
            clock=clock,
            check_every_s=check_every_s,
            verify_every_s=verify_every_s,
            damaged_wait_s=damaged_wait_s,
            monotonic=monotonic,
        )
        await store._call(_nothing)
        store._watcher = asyncio.get_running_loop().create_task(store._watch())
        return store

    @property
    def warnings(self) -> list[str]:
        """The warnings not yet taken (a copy)."""
        return self._warnings.peek()

    def take_warnings(self) -> list[str]:
        return self._warnings.take()

    def shared_reachable(self) -> bool | None:
        return None

    async def check_file(self) -> str | None:
        """Check the file now, whatever the pace: identity and header, then its pages. What was
        wrong (then already repaired, as the paced check does), or None."""
        return await self._call_worker(self._check_now)

    # --- the worker thread ------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._call_worker(lambda: self._run(fn))

    async def _call_worker(self, work: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError(f"{self.path}: store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        finally:
            while self._thread_warnings:
                self._warnings.add(self._thread_warnings.popleft())
            while self._thread_changes:
                self._hub.publish(self._thread_changes.popleft())

    async def _watch(self) -> None:
        """Runs the paced check when nothing else calls (a dashboard nobody looks at): ticks at
        half the pace, so a check is never more than 1.5 paces late."""
        while not self._closed:
            await asyncio.sleep(self.check_every_s / 2)
            try:
                await self._call(_nothing)
            except RuntimeError:  # closed meanwhile
                return
            except Exception as exc:  # the next operation meets it and says so
                log.debug("%s: check failed: %s", self.path, exc)

    def _dropped(self, key: object, exc: Exception) -> None:
        self._thread_warnings.append(f"{exc}; dropped")

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._paced_check()
        try:
            try:
                return fn(self._db())
            except sqlite3.DatabaseError as exc:
                if not _is_corrupt(exc):
                    raise
                self._recover(_Trouble(f"became unreadable ({exc})", in_place=True))
                return fn(self._db())
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            raise self._locked(BUSY_TIMEOUT_S) from None

    def _locked(self, waited_s: float) -> StateFileError:
        who = _who(lock_holder(self.path, writing=True))
        return StateFileError(
            f"{self.path}: the state database is locked by {who} (waited {waited_s:g} s); "
            f"try again when it is done, or stop it"
        )

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateFileError(
                    f"{self.path.parent}: cannot create the state directory "
                    f"({exc.strerror or exc}); fix its permissions or set XDG_STATE_HOME"
                ) from None
            conn = self._open_usable()
            if self._write_back_note is not None:
                try:
                    self._write_back(conn, self._write_back_note)
                except BaseException:
                    conn.close()
                    raise
                self._write_back_note = None
            self._conn = conn
            self._checked_at = self._verified_at = self._monotonic()  # just checked
        return self._conn

    def _open_usable(self) -> sqlite3.Connection:
        """Connect. A damaged file is moved aside, unless another process holds it: that one
        repairs it (a Corral store does, within its check pace), so wait a while for that."""
        deadline = time.monotonic() + self.damaged_wait_s
        stale_since: float | None = None
        while True:
            unsafe = self._not_yet()
            if unsafe is not None and unsafe[1] is None:
                # Cut short beside a -wal/-shm that nobody holds: left by a process that died,
                # or a new database a moment before its header (stores opening it in this very
                # process, whose locks do not show). Only what stays so is moved aside.
                now = time.monotonic()
                if stale_since is None:
                    stale_since = now
                elif now - stale_since >= SETTLE_S:
                    self._set_aside(f"{unsafe[0]} beside its -wal/-shm")
                    stale_since = None
                    continue
                time.sleep(0.02)
                continue
            stale_since = None
            if unsafe is None:
                try:
                    return self._connect()
                except sqlite3.DatabaseError as exc:
                    if _is_busy(exc):
                        raise self._locked(OPEN_DEADLINE_S) from None
                    if not _is_corrupt(exc):
                        raise StateFileError(
                            f"{self.path}: cannot open the state database ({exc}); check the "
                            f"file and its directory's permissions"
                        ) from exc
                    why = str(exc)
                except _Unusable as exc:
                    why = str(exc)
                holder = lock_holder(self.path)
                if holder is None:
                    self._set_aside(why)
                    continue
            else:
                why, holder = unsafe
            if time.monotonic() >= deadline:
                who = _who(holder)
                raise StateFileError(
                    f"{self.path}: the state file is unusable ({why}) and {who} has it open; "
                    f"waited {self.damaged_wait_s:g} s for it to repair the file. Try again in a "
                    f"moment; if this persists, stop {who} and run this again (the file is "
                    f"then moved aside and kept)"
                )
            time.sleep(0.05)  # on the worker thread, never the loop

    def _not_yet(self) -> tuple[str, int | None] | None:
        """Why SQLite must not open the path now, and which other process holds what is there;
        None when it may. Looked at before SQLite touches anything, because SQLite itself would
        do harm:

        - A database file shorter than its header is, to SQLite, a new empty database: opening
          it deletes the -wal beside it (which another process may still be writing to) and
          then waits for that process's lock to switch it to WAL. Held by another process, it
          was cut short under it, or is a new database getting its header (a matter of
          milliseconds); beside a -wal/-shm nobody holds (holder None), it is stale or new.
        - A -shm in use by another process beside a database file that nobody has open (or no
          file at all) belongs to a file that was replaced or removed under that process: SQLite
          would read that process's index for another file, and take its -wal as this one's.
        Each holder, if it is a Corral store, repairs this within its check pace."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            holder = shm_holder(self.path)
            return None if holder is None else ("removed while in use", holder)
        if size < HEADER_SIZE:
            holder = database_holder(self.path)
            if holder is not None or has_side_files(self.path):
                return f"truncated to {size} bytes", holder
            return None  # nobody's, nothing beside it: SQLite makes a new database of it
        holder = shm_holder(self.path)
        if holder is not None and database_holder(self.path) is None:
            return "replaced while in use", holder
        return None

    def _connect(self) -> sqlite3.Connection:
        # Two processes opening a new file at once can deadlock on the switch to WAL (both hold
        # a read lock, both want to write); SQLite then fails one at once without waiting, so
        # the open is retried until the deadline instead of failing the command.
        deadline = time.monotonic() + OPEN_DEADLINE_S
        while True:
            before = ident(self.path)
            try:
                conn = self._connect_once(max(0.05, deadline - time.monotonic()))
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            else:
                now_at_path = ident(self.path)
                if before is None or now_at_path == before:  # no file swapped in meanwhile
                    self._idents = {"": now_at_path}
                    for suffix in SIDE_FILES:
                        self._idents[suffix] = ident(side_file(self.path, suffix))
                    return conn
                conn.close()
                if time.monotonic() >= deadline:
                    raise sqlite3.OperationalError("the file kept changing while being opened")
            time.sleep(random.uniform(0.01, 0.05))  # on the worker thread, never the loop

    def _connect_once(self, timeout_s: float) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=min(timeout_s, BUSY_TIMEOUT_S), isolation_level=None
        )
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
            # Nothing here writes to a database already set up: a command can open it while
            # another process holds the write lock, and read.
            conn.executescript(_SCHEMA)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
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
        name = self._move_aside("corrupt", ("", *SIDE_FILES))
        self._thread_warnings.append(
            f"{self.path}: {why}; moved aside to {name}, starting with an empty state"
        )

    def _move_aside(self, label: str, suffixes: Iterable[str]) -> str | None:
        """Rename the database (suffix "") and/or its side files to `<name>.<label>-<time>`;
        the new name, or None when none of them was there."""
        target = self._aside_target(label)
        moved = False
        for suffix in suffixes:
            try:
                side_file(self.path, suffix).replace(side_file(target, suffix))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateFileError(
                    f"{self.path}: the state file is unusable and cannot be moved aside "
                    f"({exc.strerror or exc}); move it away by hand and try again"
                ) from None
            moved = True
        return target.name if moved else None

    # --- keeping one state ------------------------------------------------------------------

    def _paced_check(self) -> None:
        if self._conn is None:
            return  # opening checks everything
        now = self._monotonic()
        if now - self._checked_at < self.check_every_s:
            return
        self._checked_at = now
        trouble = self._inspect()
        if trouble is None and now - self._verified_at >= self.verify_every_s:
            self._verified_at = now
            trouble = self._verify()
        if trouble is not None:
            self._recover(trouble)

    def _check_now(self) -> str | None:
        if self._conn is None:
            self._db()
            return None
        self._checked_at = self._verified_at = self._monotonic()
        trouble = self._inspect() or self._verify()
        if trouble is None:
            return None
        self._recover(trouble)
        self._db()
        return trouble.what

    def _inspect(self) -> _Trouble | None:
        """The cheap look: is the file at the path ours, whole, and still SQLite's?"""
        mine = self._idents.get("")
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return _Trouble("was removed", in_place=False)
        except OSError:
            return None  # cannot tell (permissions changed?): the operation will say
        if (st.st_dev, st.st_ino) != mine:
            return _Trouble("was replaced by another file", in_place=False)
        if st.st_size < HEADER_SIZE:
            return _Trouble(f"was truncated to {st.st_size} bytes", in_place=True)
        header = read_header(mine)
        if header is not None and not header.startswith(MAGIC):
            return _Trouble("was overwritten (it no longer starts as an SQLite file)", True)
        for suffix in SIDE_FILES:
            want = self._idents.get(suffix)
            if want is not None and ident(side_file(self.path, suffix)) != want:
                return _Trouble(f"lost its {suffix} file (removed or replaced)", in_place=True)
        return None

    def _verify(self) -> _Trouble | None:
        """The thorough look: every page, read again from the file."""
        conn = self._conn
        if conn is None:
            return None
        try:
            conn.execute("PRAGMA shrink_memory")  # else quick_check reads the page cache
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            if _is_corrupt(exc):
                return _Trouble(f"is damaged ({exc})", in_place=True)
            return None  # busy or the like: the next check
        if problems != ["ok"]:
            return _Trouble(f"is damaged (integrity check: {'; '.join(problems[:3])})", True)
        return None

    def _recover(self, trouble: _Trouble) -> None:
        """Let go of the file without writing to it, keep the bad parts aside, and put back at
        the path what this store holds, so that no process sees the state emptied meanwhile."""
        conn, self._conn = self._conn, None
        idents, self._idents = self._idents, {}
        target = self._aside_target("corrupt" if trouble.in_place else "detached")
        if trouble.in_place:
            kept = [s for s in ("", *SIDE_FILES) if side_file(self.path, s).exists()]
        else:  # its -wal and -shm are still at the path, unless another process moved them
            kept = [s for s in SIDE_FILES if ident(side_file(self.path, s)) == idents.get(s)]
        held = self._mirror.snapshot(self._clock()).describe()
        note = (
            f"{self.path}: the state file {trouble.what} while this process had it open"
            + (f"; kept the old files as {target.name}*" if kept else "")
            + f"; wrote back what this process holds ({held})"
        )
        self._write_back_note = note  # until it is written, whatever fails below
        self._thread_warnings.append(note)
        log.warning("%s", note)
        try:
            if trouble.in_place:
                self._replace_in_place(note, target)
            else:
                # Removed: the new file is built first, while this store still holds the old
                # -shm (another process opening meanwhile waits for it), then linked in.
                fresh = None if self.path.exists() else self._build(note)
                # SQLite closes a connection whose file left its path without checkpointing
                # into it or deleting the -wal by name (checked). The old -wal and -shm must go:
                # a database at the path would take that -wal for its own and replay it.
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                    conn = None
                for suffix in kept:
                    with contextlib.suppress(FileNotFoundError):
                        side_file(self.path, suffix).replace(side_file(target, suffix))
                if fresh is not None:
                    self._place(fresh)
                # else: the file now there gets the state written into it when next opened
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _replace_in_place(self, note: str, target: Path) -> None:
        """The damaged file is still at the path, held open here: another process opening it
        meanwhile waits (it is short or unreadable, and locked by us). Swap in a complete new
        file in one rename, and only then let go of the old one."""
        fresh = self._build(note)
        try:
            try:
                os.link(self.path, target)  # the damaged file stays at the path until replaced
            except FileExistsError:
                pass
            except OSError:  # no hard links here: move it, and accept a moment without a file
                with contextlib.suppress(FileNotFoundError):
                    self.path.replace(target)
            for suffix in SIDE_FILES:
                with contextlib.suppress(FileNotFoundError):
                    side_file(self.path, suffix).replace(side_file(target, suffix))
            fresh.replace(self.path)
            self._write_back_note = None
        finally:
            with contextlib.suppress(FileNotFoundError):
                fresh.unlink()

    def _place(self, fresh: Path) -> None:
        """Link a built file in where there is none, unless another process just made one."""
        try:
            os.link(fresh, self.path)
            self._write_back_note = None
        except FileExistsError:
            pass  # the state is written into that one when it is opened
        finally:
            fresh.unlink()

    def _build(self, note: str) -> Path:
        """A complete database beside the path holding what this store holds, closed (one file,
        in WAL format like every store's), ready to be renamed or linked into place."""
        fresh = self.path.with_name(f".{self.path.name}.rebuild-{os.getpid()}-{id(self):x}")
        for suffix in ("", "-journal", *SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                side_file(fresh, suffix).unlink()
        conn = sqlite3.connect(fresh, isolation_level=None)
        try:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._write_back(conn, note)
            conn.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            conn.close()
            fresh.unlink(missing_ok=True)
            raise
        conn.close()  # the only connection: its -wal and -shm go with it
        return fresh

    def _aside_target(self, label: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.{label}-{stamp}")
        n = 1
        while any(side_file(target, s).exists() for s in ("", *SIDE_FILES)):
            target = self.path.with_name(f"{self.path.name}.{label}-{stamp}-{n}")
            n += 1
        return target

    def _write_back(self, conn: sqlite3.Connection, note: str) -> None:
        held = self._mirror.snapshot(self._clock())
        warning = Event(EventKind.WARNING, note, ts=self._clock())
        body = codec.dumps(codec.event_to_json(warning), "event warning")
        with _tx(conn):
            conn.executemany(
                "INSERT OR REPLACE INTO backends (endpoint, body) VALUES (?, ?)", held.backends
            )
            conn.executemany(
                "INSERT OR REPLACE INTO nodes (node_id, expires_at, body) VALUES (?, ?, ?)",
                held.nodes,
            )
            if held.coordinator is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO coordinator (id, body) VALUES (0, ?)",
                    (held.coordinator,),
                )
            conn.executemany(
                "INSERT INTO events (body) VALUES (?)", [(b,) for b in [*held.events, body]]
            )
            conn.execute(
                "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                (self.max_events,),
            )
        self._mirror.add_events([body])
        self._thread_changes.extend(
            [Change("backends"), Change("nodes"), Change("coordinator"), Change("events", warning)]
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
            self._mirror.register_node(reg.node_id, expires_at, body)

        await self._call(write)
        self._hub.publish(Change("nodes"))

    async def unregister_node(self, node_id: str) -> None:
        codec.check_node_id(node_id, "unregister_node")

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))
            self._mirror.unregister_node(node_id)

        await self._call(write)
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
            return self._nodes_read.read(
                rows,
                lambda key, body: codec.stored_node(body, self._where("nodes", key), key),
                self._dropped,
                codec.CodecError,
            )

        return await self._call(read)

    # --- backends -----------------------------------------------------------------------------

    async def put_backends(self, records: list[BackendRecord]) -> None:
        if not records:
            return
        now = self._clock()

        def write(conn: sqlite3.Connection) -> None:
            # Encoded here, on the worker: checking each record's JSON costs about 0.1 ms, and
            # a few hundred of them every recheck would stall the event loop (the API's p99).
            bodies = {
                codec.endpoint_key(r.endpoint): codec.backend_to_json(r, written_at=now)
                for r in records
            }
            written: list[tuple[str, str]] = []
            with _tx(conn):
                for key, body in bodies.items():
                    row = conn.execute(
                        "SELECT body FROM backends WHERE endpoint = ?", (key,)
                    ).fetchone()
                    if row is not None:
                        with contextlib.suppress(codec.CodecError):  # a bad row is replaced
                            old = codec.decode(row[0], key, codec.backend_from_json)
                            body["first_seen"] = min(old.first_seen, body["first_seen"])
                    text = codec.dumps(body, key)
                    conn.execute(
                        "INSERT OR REPLACE INTO backends (endpoint, body) VALUES (?, ?)",
                        (key, text),
                    )
                    written.append((key, text))
            for key, text in written:
                self._mirror.put_backend(key, text)

        await self._call(write)
        self._hub.publish(Change("backends"))

    async def remove_backend(self, endpoint: Endpoint) -> None:
        key = codec.endpoint_key(endpoint)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM backends WHERE endpoint = ?", (key,))
            self._mirror.remove_backend(key)

        await self._call(write)
        self._hub.publish(Change("backends"))

    async def backends(self) -> list[BackendRecord]:
        def read(conn: sqlite3.Connection) -> list[BackendRecord]:
            rows = conn.execute("SELECT endpoint, body FROM backends ORDER BY endpoint").fetchall()
            return self._backends_read.read(
                rows,
                lambda key, body: codec.stored_backend(
                    body, self._where("backends", key), key, self.opened_at
                ),
                self._dropped,
                codec.CodecError,
            )

        return await self._call(read)

    # --- coordinator --------------------------------------------------------------------------

    async def set_coordinator(self, record: CoordinatorRecord) -> None:
        body = codec.dumps(codec.coordinator_to_json(record), "coordinator")

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO coordinator (id, body) VALUES (0, ?)", (body,))
            self._mirror.set_coordinator(body)

        await self._call(write)
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
            self._mirror.add_events(bodies)

        await self._call(write)
        for event in events:
            self._hub.publish(Change("events", event))

    async def events(self, limit: int = 100) -> list[Event]:
        def read(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT id, body FROM events ORDER BY id DESC LIMIT ?",
                (max(0, min(limit, self.max_events)),),
            ).fetchall()
            return self._events_read.read(
                reversed(rows),
                lambda key, body: codec.decode(
                    body, self._where("events", key), codec.event_from_json
                ),
                self._dropped,
                codec.CodecError,
            )

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
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._hub.close()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._shut)
        self._pool.shutdown(wait=False)

    def _shut(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
