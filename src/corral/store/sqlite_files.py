"""The state database as files: which inode is at the path, whether it still starts like an SQLite
database, and which other process holds SQLite's locks on it.

One rule shapes all of it: POSIX (fcntl) locks belong to a process and a file, not to a
descriptor, so closing *any* descriptor on the file drops every lock this process holds on it,
SQLite's included (and those of another store's connection in this process, opening at that
very moment). Opening the database (or its -shm) to read a few bytes and closing it again would
let another process take the lock SQLite relies on, checkpoint, and delete the -wal under us.
So nothing here opens those files: bytes are read through the descriptor SQLite already has
(found in /proc/self/fd), and locks are read from /proc/locks. Linux only (like the rest of
Corral's lower rooms); elsewhere the answers are "cannot tell" and callers carry on.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
HEADER_SIZE = 100
SIDE_FILES = ("-wal", "-shm")
# SQLite's unix lock bytes in the database file (os_unix.c): PENDING and RESERVED (a writer in
# rollback mode), then the SHARED range. A connection in WAL mode holds a read lock on the
# SHARED range for as long as it is open (checked: /proc/locks, and F_GETLK from another
# process, show it while the connection sits idle).
_PENDING = 0x40000000
_DB_WRITER = (_PENDING, 2)
_DB_ANY = (_PENDING, 2 + 510)
# The -shm file's lock bytes: the WAL write lock (120), checkpoint, recover, five read marks,
# then DMS (128, held shared by every connection using the file).
_SHM_WRITER = (120, 1)
_SHM_ANY = (120, 9)
PROC_LOCKS = Path("/proc/locks")

Ident = tuple[int, int]  # (st_dev, st_ino): which file, whatever its name


def ident(path: Path) -> Ident | None:
    """The file now at `path`, or None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def side_file(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def has_side_files(path: Path) -> bool:
    """Is there a -wal or -shm beside `path`?"""
    return any(side_file(path, s).exists() for s in SIDE_FILES)


def own_descriptor(which: Ident, proc_fd: Path = Path("/proc/self/fd")) -> int | None:
    """A descriptor this process already has open on the file `which` (SQLite's), or None."""
    try:
        names = os.listdir(proc_fd)
    except OSError:
        return None
    for name in names:
        try:
            fd = int(name)
            st = os.fstat(fd)
        except (ValueError, OSError):
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == which:
            return fd
    return None


def read_header(which: Ident) -> bytes | None:
    """The first bytes of the file `which`, read through this process's own descriptor on it
    (never one opened for the purpose); None when the process has none or the read failed."""
    fd = own_descriptor(which)
    if fd is None:
        return None
    try:
        data = os.pread(fd, HEADER_SIZE, 0)
        st = os.fstat(fd)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != which:  # the descriptor was closed and reused meanwhile
        return None
    return data


def _other_locker(path: Path, start: int, length: int, locks: str | None) -> int | None:
    """The pid of another process holding a POSIX lock on bytes [start, start+length) of the
    file at `path`, per /proc/locks (`locks`: its text); None: none, or cannot tell."""
    which = ident(path)
    if which is None or locks is None:
        return None
    dev, ino = which
    key = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    last = start + length - 1
    me = os.getpid()
    for line in locks.splitlines():
        # "1: POSIX  ADVISORY  READ 4242 fe:00:2154500 1073741826 1073742335" ("->": waiting)
        fields = line.split()
        if len(fields) != 8 or fields[1] not in ("POSIX", "OFDLCK") or fields[5] != key:
            continue
        try:
            pid, lo = int(fields[4]), int(fields[6])
            hi = (1 << 63) - 1 if fields[7] == "EOF" else int(fields[7])
        except ValueError:
            continue
        if pid != me and lo <= last and hi >= start:
            return pid
    return None


def _read_locks() -> str | None:
    try:
        return PROC_LOCKS.read_text()
    except OSError:
        return None


def database_holder(path: Path) -> int | None:
    """Another process holding a lock on the database file now at `path` (any SQLite lock: in
    WAL mode, every open connection that has read holds one). A pid of -1: an open file
    description lock, pid unknown."""
    return _other_locker(path, *_DB_ANY, _read_locks()) if path.exists() else None


def shm_holder(path: Path) -> int | None:
    """Another process using the -shm file now beside `path` (every WAL connection locks it)."""
    shm = side_file(path, "-shm")
    return _other_locker(shm, *_SHM_ANY, _read_locks()) if shm.exists() else None


def lock_holder(path: Path, *, writing: bool = False) -> int | None:
    """The pid of another process holding one of SQLite's locks on the database at `path` (it
    has the file open), or with `writing` its write lock; None: nobody else, or cannot tell.
    This process's own locks are never reported."""
    locks = _read_locks()
    shm = side_file(path, "-shm")
    if writing:
        found = _other_locker(shm, *_SHM_WRITER, locks)
        return found if found is not None else _other_locker(path, *_DB_WRITER, locks)
    found = _other_locker(path, *_DB_ANY, locks)
    return found if found is not None else _other_locker(shm, *_SHM_ANY, locks)
