"""rpc-server's tensor cache (`-c`): where it lives and how much it holds.

ggml-rpc-server with `-c` keeps every weight tensor larger than 10 MiB it receives as one file
named by its hash, in `$LLAMA_CACHE/rpc`, else llama.cpp's cache directory + `rpc`
(`fs_get_cache_directory()` in tools/rpc/rpc-server.cpp: `$XDG_CACHE_HOME/llama.cpp`, else
`$HOME/.cache/llama.cpp`; an empty variable counts as unset). A client sends the hash first and
the tensor does not cross the link when the file is there.

The size is measured by a walk that visits at most `max_files` entries (a cache can grow without
bound; a walk of it must not), in a thread, at most every `refresh_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REFRESH_S = 30.0
MAX_FILES = 100_000


@dataclass(frozen=True, slots=True)
class CacheUsage:
    bytes: int
    files: int
    capped: bool = False  # the walk stopped at its bound: at least this much

    def describe(self) -> str:
        mib = self.bytes / 1024**2
        prefix = "at least " if self.capped else ""
        return f"{prefix}{mib:.1f} MiB in {prefix}{self.files} files"


def shown_path(text: str, max_len: int = 4096) -> str:
    """Pure: a directory name as records carry it: one line of printable text (anything else
    replaced by U+FFFD), at most `max_len` characters."""
    shown = "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
    return shown if len(shown) <= max_len else shown[: max_len - 1] + "…"


def rpc_cache_dir(env: Mapping[str, str], home: str, platform: str = sys.platform) -> Path:
    """Pure: the directory rpc-server `-c` uses with environment `env` (`home`: the account's
    home directory, used when HOME is unset)."""
    if env.get("LLAMA_CACHE"):
        return Path(env["LLAMA_CACHE"]) / "rpc"
    if platform == "win32":
        base = Path(env.get("LOCALAPPDATA", ""))
    elif platform == "darwin":
        base = Path(env.get("HOME") or home) / "Library" / "Caches"
    else:
        base = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME") or home) / ".cache")
    return base / "llama.cpp" / "rpc"


def measure(directory: Path, max_files: int = MAX_FILES) -> CacheUsage:
    """Blocking: bytes and files under `directory`, visiting at most `max_files` entries.

    A directory that does not exist (yet) holds nothing; symbolic links are not followed.
    """
    total = files = visited = 0
    pending = [directory]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                visited += 1
                if visited > max_files:
                    return CacheUsage(total, files, capped=True)
                with contextlib.suppress(FileNotFoundError):  # evicted while we walk
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        files += 1
    return CacheUsage(total, files)


def uses_cache(argv: list[str]) -> bool:
    """Pure: does this rpc-server command line turn the cache on? (`-c` or `--cache`)"""
    return any(arg in ("-c", "--cache") for arg in argv[1:])


def process_cache_dir(pid: int) -> Path | None:
    """Blocking: the cache directory of the running rpc-server `pid`, or None when it runs
    without `-c` (or cannot be read: another user's process)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if not uses_cache(proc.cmdline()):
            return None
        env = proc.environ()
        uid = proc.uids().real
    except psutil.Error:
        return None
    return rpc_cache_dir(env, home=account_home(uid))


def account_home(uid: int) -> str:
    """Blocking: the home directory of account `uid` (rpc-server's fallback when HOME is unset)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/"


@dataclass
class CacheGauge:
    """The last measured usage of one cache directory, re-measured at most every `refresh_s`
    in a thread; `refresh()` never waits for the walk."""

    directory: Path
    refresh_s: float = REFRESH_S
    max_files: int = MAX_FILES
    clock: Callable[[], float] = time.monotonic
    walk: Callable[[Path, int], CacheUsage] = measure
    usage: CacheUsage | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    _measured_at: float | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    async def measure_now(self) -> CacheUsage | None:
        """Measure and wait for it (for the node's start line)."""
        await self._measure()
        return self.usage

    def refresh(self) -> None:
        """Start a walk in the background when the last one is `refresh_s` old."""
        if self._task is not None and not self._task.done():
            return
        now = self.clock()
        if self._measured_at is not None and now - self._measured_at < self.refresh_s:
            return
        self._measured_at = now  # counts from the start, so a slow walk does not run back to back
        self._task = asyncio.create_task(self._measure())

    async def _measure(self) -> None:
        self._measured_at = self.clock()
        try:
            self.usage = await asyncio.to_thread(self.walk, self.directory, self.max_files)
        except OSError as exc:
            if str(exc) != self.error:
                log.warning("rpc cache %s: cannot measure: %s", self.directory, exc)
            self.error = str(exc)
            return
        self.error = None

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
