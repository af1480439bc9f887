"""Read one LoadSample of a loading llama-server (loading.py judges it). Blocking: use a thread.

Every figure is optional: a process that is gone, or one we may not look into (an adopted
llama-server of another user), gives None for what cannot be read, never an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from corral.coordinator.loading import LoadSample
from corral.net.sockdiag import read_tcp_bytes

MAX_FDS = 4096  # descriptors looked at, at most: llama-server holds a few dozen


def read_load_sample(
    pid: int | None, log_path: Path | None, http_port: int, at: float
) -> LoadSample:
    """`http_port` is llama-server's own listener: connections on it are clients asking it
    things (our /health polls among them), not its backends, and are left out."""
    if pid is None:
        return LoadSample(at)
    sent = received = rchar = wchar = rss = None
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            io = proc.io_counters()
            rchar, wchar = getattr(io, "read_chars", None), getattr(io, "write_chars", None)
            rss = proc.memory_info().rss
    except (psutil.Error, OSError):
        pass
    links = read_tcp_bytes(_socket_inodes(pid))
    if links is not None:
        mine = [c for c in links if c.local_port != http_port]
        sent, received = sum(c.sent for c in mine), sum(c.received for c in mine)
    return LoadSample(at, sent, received, rchar, wchar, rss, _size(log_path))


def _socket_inodes(pid: int) -> set[int]:
    fd_dir = f"/proc/{pid}/fd"
    inodes: set[int] = set()
    try:
        with os.scandir(fd_dir) as entries:
            for i, entry in enumerate(entries):
                if i >= MAX_FDS:
                    break
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue  # closed meanwhile
                if target.startswith("socket:[") and target.endswith("]"):
                    inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _size(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return path.stat().st_size
    except OSError:
        return None
