"""Following a log file for `GET /api/logs`: its last lines, then each line it gains.

Bounded on every side: at connect at most `lines` lines, found in at most `lines * (max_line +
1)` bytes of its end (1 MiB at most); each line cut at `max_line` bytes (a partial line longer
than that is sent cut, not held); at most `chunk` bytes read per look; at most `max_clients`
followers at once (`LogFollowers`). A file truncated or replaced (llama-server's log is rotated
when a start finds it oversized) is followed from its start. Every file access runs in a thread;
the loop only waits between looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LINES = 200
MAX_LINES = 1000
MAX_LINE = 4096  # bytes; llama-server's longest lines (a chat template, a tensor table) fit
CHUNK = 64 * 1024
TAIL_MOST = 1024 * 1024
LOOK_S = 0.25
MAX_CLIENTS = 4
CUT = "…"


def cut(raw: bytes, max_line: int) -> str:
    """Pure: one line as text, at most `max_line` bytes of it, marked when cut."""
    if len(raw) <= max_line:
        return raw.decode(errors="replace")
    return raw[:max_line].decode(errors="ignore") + CUT


@dataclass
class Lines:
    """Pure: bytes in, whole lines out. A partial line is kept until its end, up to max_line;
    past that it is sent cut at once and the rest of it, up to its newline, is dropped."""

    max_line: int = MAX_LINE
    _partial: bytes = b""
    _dropping: bool = False  # the rest of a line already sent cut

    def feed(self, data: bytes) -> list[str]:
        if self._dropping:
            end = data.find(b"\n")
            if end < 0:
                return []
            self._dropping, data = False, data[end + 1 :]
        parts = (self._partial + data).split(b"\n")
        self._partial = parts.pop()
        out = [cut(p.rstrip(b"\r"), self.max_line) for p in parts]
        if len(self._partial) > self.max_line:
            out.append(cut(self._partial, self.max_line))
            self._partial, self._dropping = b"", True
        return out

    def reset(self) -> None:
        self._partial, self._dropping = b"", False


def last_lines(data: bytes, at_start: bool, lines: int, max_line: int) -> list[str]:
    """Pure: the last `lines` whole lines of `data`, the end of a file (`at_start`: it is the
    whole file, so its first line is whole too). An unfinished last line is left for later."""
    parts = data.split(b"\n")
    parts.pop()  # after the last newline: unfinished (or empty)
    if not at_start and parts:
        parts.pop(0)  # began before what was read
    return [cut(p.rstrip(b"\r"), max_line) for p in parts[-lines:]] if lines else []


@dataclass
class _Where:
    inode: int | None = None
    offset: int = 0


def _tail(path: Path, lines: int, max_line: int, where: _Where) -> list[str]:
    """The file's last lines; `where` then points after its last newline."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            span = min(st.st_size, TAIL_MOST, lines * (max_line + 1) + 1)
            f.seek(st.st_size - span)
            data = f.read(span)
    except FileNotFoundError:
        where.inode, where.offset = None, 0
        return []
    where.inode = st.st_ino
    where.offset = st.st_size - span + data.rfind(b"\n") + 1
    return last_lines(data, span == st.st_size, lines, max_line)


def _more(path: Path, where: _Where, chunk: int) -> tuple[bytes, bool]:
    """What the file gained since `where` (at most `chunk` bytes), and whether it is another
    file than before (replaced, or truncated): then it is read from its start."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            fresh = st.st_ino != where.inode or st.st_size < where.offset
            if fresh:
                where.inode, where.offset = st.st_ino, 0
            if st.st_size <= where.offset:
                return b"", fresh
            f.seek(where.offset)
            data = f.read(chunk)
    except FileNotFoundError:
        fresh = where.inode is not None
        where.inode, where.offset = None, 0
        return b"", fresh
    where.offset += len(data)
    return data, fresh


async def follow(
    path: Path,
    lines: int = DEFAULT_LINES,
    *,
    max_line: int = MAX_LINE,
    chunk: int = CHUNK,
    look_s: float = LOOK_S,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[str, None]:
    """The last `lines` lines of `path`, then each new one, until `stop` is set (or the caller
    stops iterating). A missing file is waited for."""
    where = _Where()
    for line in await asyncio.to_thread(_tail, path, lines, max_line, where):
        yield line
    pending = Lines(max_line)
    stop = stop or asyncio.Event()
    while not stop.is_set():
        data, fresh = await asyncio.to_thread(_more, path, where, chunk)
        if fresh:
            pending.reset()
        for line in pending.feed(data):
            yield line
        if len(data) < chunk:  # caught up: wait before the next look
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), look_s)


@dataclass
class LogFollowers:
    """The app's `/api/logs` streams: counted against `max_clients`, all ended by `close()`."""

    path: Path | None
    max_clients: int = MAX_CLIENTS
    look_s: float = LOOK_S
    clients: int = 0
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def admit(self) -> bool:
        if self.clients >= self.max_clients:
            return False
        self.clients += 1
        return True

    def leave(self) -> None:
        self.clients -= 1

    def close(self) -> None:
        self.closing.set()
