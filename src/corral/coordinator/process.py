"""The llama-server the coordinator supervises: one it started, or one it found running.

Both look the same to the runner: a pid, the backend set it holds, whether it has exited (and
how), a stop (SIGTERM, then SIGKILL after a grace period), and its log since it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import psutil

from corral.endpoint import Endpoint
from corral.llama.processes import Coordinator, find_coordinators
from corral.llama.server import describe_exit
from corral.llama.supervisor import Child

LOG_ROTATE_BYTES = 10 * 1024 * 1024  # at a start, a bigger log is moved to `.1`
# While it runs (at -lv 4 an idle llama-server logs ~80 B/s, a request ~3 KB): past this size
# its log is copied to `.1` and emptied in place, as logrotate's copytruncate does. The file is
# open for appending, so llama-server's next line lands at the new start; a line written
# between the copy and the truncation is lost (a window of microseconds, once per 32 MiB).
LOG_CAP_BYTES = 32 * 1024 * 1024
# What is read back of one run's log to explain an exit: its head and its tail.
LOG_EXPLAIN_BYTES = 512 * 1024


class Supervised(Protocol):
    backends: tuple[Endpoint, ...]
    model: str | None
    started_at: float  # monotonic
    adopted: bool

    @property
    def pid(self) -> int | None: ...
    async def exited(self) -> str | None:
        """None while running; else how it ended ("killed by SIGABRT ...")."""
        ...

    async def stop(self, grace: float) -> None: ...
    def log_since_start(self) -> str:
        """This run's log, at most LOG_EXPLAIN_BYTES: its head and its tail when longer."""
        ...

    def trim_log(self) -> None:
        """Keep the log under LOG_CAP_BYTES while it runs. Blocking: use a thread."""
        ...

    def log_head(self, limit: int) -> str:
        """The first `limit` bytes it logged since it started ("" when its log is not ours)."""
        ...


@dataclass
class OwnedServer:
    """A llama-server we start: our child, logging to a file, dying with us (PDEATHSIG)."""

    argv: list[str]
    log_path: Path
    env: dict[str, str]
    backends: tuple[Endpoint, ...]
    model: str | None
    started_at: float = 0.0
    adopted: bool = False
    child: Child = field(init=False)
    _log_offset: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.child = Child(self.argv, self.log_path, self.env)

    @property
    def pid(self) -> int | None:
        return self.child.pid

    async def start(self) -> None:
        self._log_offset = await asyncio.to_thread(_prepare_log, self.log_path)
        self.started_at = time.monotonic()
        await self.child.start()

    async def exited(self) -> str | None:
        code = self.child.returncode
        return None if code is None else describe_exit(code)

    async def stop(self, grace: float) -> None:
        await self.child.stop(grace)

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                return _head_and_tail(f, self._log_offset, LOG_EXPLAIN_BYTES)
        except OSError:
            return ""

    def trim_log(self) -> None:
        if _copy_truncate(self.log_path, LOG_CAP_BYTES):
            self._log_offset = 0

    def log_head(self, limit: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read(limit).decode(errors="replace")
        except OSError:
            return ""


@dataclass
class AdoptedServer:
    """A llama-server that was already serving our port: supervised by PID, not our child."""

    found: Coordinator
    proc: psutil.Process  # remembers the start time, so a reused PID is not mistaken for it
    model: str | None  # absolute: its command line may name it relative to its own cwd
    backends: tuple[Endpoint, ...] = ()
    started_at: float = field(default_factory=time.monotonic)
    adopted: bool = True

    def __post_init__(self) -> None:
        self.backends = self.found.backends

    @property
    def pid(self) -> int | None:
        return self.found.pid

    async def exited(self) -> str | None:
        alive = await asyncio.to_thread(_alive, self.proc)
        return None if alive else describe_exit(None)

    async def stop(self, grace: float) -> None:
        await asyncio.to_thread(_terminate, self.proc, grace)

    def log_since_start(self) -> str:
        return ""  # its output goes wherever whoever started it sent it

    def trim_log(self) -> None:
        return None

    def log_head(self, limit: int) -> str:
        return ""


def find_on_port(host: str, port: int) -> AdoptedServer | None:
    """A running llama-server serving `host:port`. Blocking (walks /proc): use a thread."""
    wildcard = ("0.0.0.0", "::")
    for coord in find_coordinators():
        if coord.port == port and (
            coord.host == host or coord.host in wildcard or host in wildcard
        ):
            try:
                proc = psutil.Process(coord.pid)
                model = coord.model
                if model and not os.path.isabs(model):
                    model = os.path.join(proc.cwd(), model)
                return AdoptedServer(coord, proc, model)
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:  # its cwd: keep the name as it was given
                return AdoptedServer(coord, psutil.Process(coord.pid), coord.model)
    return None


def _prepare_log(path: Path) -> int:
    """Rotate an oversized log; return where this run's output will start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _head_and_tail(f: BinaryIO, start: int, limit: int) -> str:
    """From `start` on: all of it when it fits in `limit`, else its first and last halves (the
    first errors name a cause, the last lines say how it ended)."""
    end = f.seek(0, os.SEEK_END)
    f.seek(start)
    if end - start <= limit:
        return f.read(limit).decode(errors="replace")
    head = f.read(limit // 2).decode(errors="replace")
    f.seek(end - limit // 2)
    tail = f.read(limit // 2).decode(errors="replace")
    return f"{head}\n[... {end - start - limit} bytes of the log left out ...]\n{tail}"


def _copy_truncate(path: Path, cap: int) -> bool:
    """Past `cap` bytes, copy the log to `.1` and empty it in place; True if it did."""
    try:
        if path.stat().st_size <= cap:
            return False
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
    except OSError:
        return False
    return True


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _terminate(proc: psutil.Process, grace: float) -> None:
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(grace)
