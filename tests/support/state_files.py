"""What people and accidents do to a state file while a store has it open, and another process
holding one open.

- `DAMAGES`: unlinked, replaced by another database (renamed over it), truncated to 0 bytes,
  overwritten with garbage in place; each with the words the store's warning uses for it.
- `held_open(path, mode)`: a separate Python process with its own SQLite connection on `path`
  (WAL mode, as a store has) that only holds it ("hold"), or then truncates the file under
  itself ("truncate") or holds the write lock ("write-lock"); yields its pid, and is ended by
  PID at the end. It repairs nothing: it stands for a process that is not a Corral store.

Damaging the file from the test's own process opens and closes a descriptor on it, which drops
this process's POSIX locks on it (see corral.store.sqlite_files); harmless here, where no other
process uses the file.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path

from corral.endpoint import Endpoint
from corral.store.sqlite import EmbeddedStore
from tests.support.records import backend

FOREIGN = Endpoint("10.7.7.7", 50052)  # the backend the replacing database holds


@dataclass(frozen=True)
class Damage:
    name: str
    says: str  # in the store's warning
    do: Callable[[Path], Awaitable[None]]


async def _unlink(path: Path) -> None:
    os.unlink(path)


async def _replace(path: Path) -> None:
    """Another store's file, holding another backend, renamed over the path (its -wal and -shm
    are gone: it was closed)."""
    other = path.with_name("other.db")
    store = await EmbeddedStore.open(other)
    try:
        await store.put_backends([backend(FOREIGN)])
    finally:
        await store.close()
    os.replace(other, path)


async def _truncate(path: Path) -> None:
    os.truncate(path, 0)


def overwrite_in_place(path: Path) -> None:
    """Random bytes over the whole file: the same file (inode), the same size."""
    path.write_bytes(os.urandom(path.stat().st_size))


async def _garbage(path: Path) -> None:
    overwrite_in_place(path)


def kept_aside(state_dir: Path, label: str = "corrupt") -> list[Path]:
    """What a store moved aside in `state_dir`: `state.db.<label>-<time>*`."""
    return sorted(state_dir.glob(f"state.db.{label}-*"))


DAMAGES = [
    Damage("unlinked", "was removed", _unlink),
    Damage("replaced", "was replaced by another file", _replace),
    Damage("truncated", "was truncated to 0 bytes", _truncate),
    Damage("garbage", "was overwritten", _garbage),
]


def write_foreign_database(path: Path) -> None:
    """A valid SQLite file that is no store's (what a person might put there)."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE unrelated (a)")
        conn.commit()


_HOLDER = r"""
import os, sqlite3, sys
path, mode = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(path, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE IF NOT EXISTS held (a)")
conn.execute("INSERT INTO held VALUES (1)")
if mode == "truncate":
    os.truncate(path, 0)  # by name: no descriptor of ours is closed, our locks stay
elif mode == "write-lock":
    conn.execute("BEGIN IMMEDIATE")
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@asynccontextmanager
async def held_open(path: Path, mode: str) -> AsyncIterator[int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        str(path),
        mode,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line == b"ready\n", line
        yield proc.pid
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()  # the process this helper started, by its PID
            await proc.wait()
