"""The pidfile of a running `corral coordinator run`: one per port, under the state directory.

It holds the PID and that process's start time, so a PID the kernel has since given to another
program is never mistaken for the coordinator (and never signalled).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

PIDFILE_DIR = "coordinator"


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    create_time: float


def pidfile_path(state: Path, port: int) -> Path:
    return state / PIDFILE_DIR / f"{port}.pid"


def log_path(state: Path, port: int) -> Path:
    return state / PIDFILE_DIR / f"llama-server-{port}.log"


def read_owner(path: Path) -> Owner | None:
    """The live process the pidfile names, or None (no file, unreadable, or it is gone)."""
    try:
        data = json.loads(path.read_text())
        owner = Owner(int(data["pid"]), float(data["create_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        started = psutil.Process(owner.pid).create_time()
    except psutil.Error:
        return None
    return owner if abs(started - owner.create_time) < 0.01 else None


def claim(path: Path) -> None:
    """Write our PID, unless another live coordinator already holds this port's pidfile."""
    other = read_owner(path)
    if other is not None and other.pid != os.getpid():
        raise AlreadyRunning(f"a coordinator already runs for this port (pid {other.pid})")
    path.parent.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    tmp = path.with_suffix(f".{me.pid}.tmp")
    tmp.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time()}) + "\n")
    tmp.replace(path)


def release(path: Path) -> None:
    """Remove the pidfile if it is still ours."""
    owner = read_owner(path)
    if owner is not None and owner.pid == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()
