"""Source `file`: `rpc_backends.conf`, one `host:port` a line.

`#` starts a comment (whole line or inline), blank lines are skipped, IPv6 goes in brackets.
A bad line is reported as file:line with the reason; the good lines are still used.

The file is an outside input, so everything about reading it is bounded:

- only a regular file is read (a symlink to one is fine); a directory, device, FIFO or socket is
  refused by name. It is opened with O_NONBLOCK, so a FIFO swapped in after the check cannot
  block the open, and checked again on the open descriptor;
- at most MAX_FILE_BYTES are read, counted while reading (a file's size as stat tells it can
  be anything: 0 for /proc files, wrong on some file systems);
- a line longer than MAX_LINE_BYTES is skipped; at most MAX_ENDPOINTS endpoints are used, and
  one warning says how many lines past them were dropped;
- warnings are summarised: the first SHOWN_PER_KIND of each kind, then one line with the count
  of the rest;
- the read runs in a daemon thread that `collect` waits on for at most READ_TIMEOUT_S: a file
  system that hangs (a dead NFS server) costs one stuck thread, never a stuck discovery run or
  a process that cannot exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

from corral.endpoint import Endpoint, EndpointError, parse_endpoint
from corral.sources.base import SourceReport
from corral.types import Sighting, SourceName

FILE_NAME = "rpc_backends.conf"
MAX_FILE_BYTES = 1 << 20  # 1 MiB, counted while reading
MAX_LINE_BYTES = 512
MAX_ENDPOINTS = 4096  # distinct endpoints used from one file
MAX_PARSED = 2 * MAX_ENDPOINTS  # different line values parsed: good, bad, other spellings
SHOWN_PER_KIND = 5  # warnings of one kind shown line by line; the rest are counted
READ_TIMEOUT_S = 5.0

_CHUNK = 64 * 1024

T = TypeVar("T")


class Problem(Enum):
    """The kinds of bad line, each summarised on its own."""

    BAD = "bad lines"
    DUPLICATE = "duplicate lines"
    LONG = f"lines longer than {MAX_LINE_BYTES} bytes"


@dataclass(slots=True)
class ParsedFile:
    """What a backends file holds: the good lines, the problems found, how many of each kind
    (messages may be kept for only the first few of a kind), and the lines past the cap."""

    good: list[tuple[int, Endpoint]] = field(default_factory=list)
    problems: list[tuple[Problem, str]] = field(default_factory=list)
    counts: Counter[Problem] = field(default_factory=Counter)
    dropped: int = 0  # meaningful lines not read because MAX_ENDPOINTS were already in use
    unparsed: int = 0  # meaningful lines not read because MAX_PARSED values were parsed


def _too_long(raw: str) -> bool:
    if len(raw) <= MAX_LINE_BYTES // 4:  # a UTF-8 character is at most 4 bytes
        return False
    return len(raw.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES


def parse_lines(
    text: str,
    path: str,
    *,
    max_endpoints: int = MAX_ENDPOINTS,
    max_parsed: int = MAX_PARSED,
    keep_per_kind: int | None = None,
) -> ParsedFile:
    """Pure: parse a whole backends file. `keep_per_kind` bounds the messages kept per kind
    (None: all); every problem is counted either way. Past `max_endpoints` endpoints, or once
    `max_parsed` different values were parsed, lines with a new value are counted, not parsed."""
    parsed = ParsedFile()
    # The same text parses the same way: a line repeated 100,000 times is parsed once.
    known: dict[str, Endpoint | str] = {}
    used: set[Endpoint] = set()

    def keep(kind: Problem) -> bool:
        """Count one problem of `kind`; True when its message is to be kept."""
        parsed.counts[kind] += 1
        return keep_per_kind is None or parsed.counts[kind] <= keep_per_kind

    for number, raw in enumerate(text.splitlines(), start=1):
        if _too_long(raw):
            if keep(Problem.LONG):
                parsed.problems.append(
                    (Problem.LONG, f"{path}:{number}: longer than {MAX_LINE_BYTES} bytes")
                )
            continue
        value = raw.split("#", 1)[0].strip()
        if not value:
            continue
        result = known.get(value)
        full = len(parsed.good) >= max_endpoints
        if result is None:
            if full:  # past the cap nothing new is parsed: it could not be used
                parsed.dropped += 1
                continue
            if len(known) >= max_parsed:  # parsing costs: a file of junk is read so far
                parsed.unparsed += 1
                continue
            try:
                result = parse_endpoint(value)
            except EndpointError as exc:
                result = str(exc)
            known[value] = result
        if isinstance(result, str):
            if keep(Problem.BAD):
                parsed.problems.append((Problem.BAD, f"{path}:{number}: {result}"))
        elif result in used:
            if keep(Problem.DUPLICATE):
                message = f"{path}:{number}: duplicate of an earlier line: {value!r}"
                parsed.problems.append((Problem.DUPLICATE, message))
        elif full:
            parsed.dropped += 1
        else:
            used.add(result)
            parsed.good.append((number, result))
    return parsed


def cap_warning(path: str, dropped: int, max_endpoints: int = MAX_ENDPOINTS) -> str:
    return (
        f"{path}: more than {max_endpoints:,} endpoints; the first {max_endpoints:,} are used, "
        f"{dropped:,} more lines dropped"
    )


def budget_warning(path: str, unparsed: int, max_parsed: int = MAX_PARSED) -> str:
    return f"{path}: more than {max_parsed:,} different entries; {unparsed:,} more lines not read"


def limit_warnings(parsed: ParsedFile, path: str) -> list[str]:
    out = [cap_warning(path, parsed.dropped)] if parsed.dropped else []
    return out + ([budget_warning(path, parsed.unparsed)] if parsed.unparsed else [])


def summarise(parsed: ParsedFile, path: str, shown: int = SHOWN_PER_KIND) -> list[str]:
    """The first `shown` messages of each kind in line order, then one line per kind with the
    count of the rest, then the limits' warnings."""
    seen: Counter[Problem] = Counter()
    out: list[str] = []
    for kind, message in parsed.problems:
        seen[kind] += 1
        if seen[kind] <= shown:
            out.append(message)
    for kind in Problem:
        rest = parsed.counts[kind] - min(shown, parsed.counts[kind])
        if rest > 0:
            out.append(f"{path}: and {rest:,} more {kind.value}")
    return out + limit_warnings(parsed, path)


def parse_backends_file(text: str, path: str) -> tuple[list[tuple[int, Endpoint]], list[str]]:
    """Pure: (line number, endpoint) for every good line, and one message per bad line (plus
    one for the lines past each limit, if any)."""
    parsed = parse_lines(text, path)
    return parsed.good, [message for _, message in parsed.problems] + limit_warnings(parsed, path)


def candidate_paths(explicit: str | None, env: dict[str, str], cwd: Path) -> list[Path]:
    """Where to look, in order: flag/env; ./; $XDG_CONFIG_HOME/corral/; /etc/corral/."""
    if explicit:
        return [Path(explicit)]
    if env.get("CORRAL_BACKENDS_FILE"):
        return [Path(env["CORRAL_BACKENDS_FILE"])]
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return [
        cwd / FILE_NAME,
        Path(xdg) / "corral" / FILE_NAME,
        Path("/etc/corral") / FILE_NAME,
    ]


class NotReadable(Exception):
    """The file is there but is not read (what it is, or its size); the message says why."""


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is, for a message."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(path: Path, kind: str) -> NotReadable:
    target = os.path.realpath(path)
    shown = f"{kind} ({target})" if target != str(path) else kind
    return NotReadable(f"cannot read: it is {shown}, not a regular file")


def read_capped(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """Blocking: the bytes of the regular file `path` (symlinks followed), at most `limit`.

    Raises NotReadable for anything else or anything longer, OSError when it cannot be opened
    or read. Never blocks on a FIFO or a device: those are refused before opening, and the open
    itself is non-blocking in case one was swapped in since."""
    kind = file_kind(os.stat(path).st_mode)
    if kind is not None:
        raise _refuse(path, kind)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(path, flags)
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise _refuse(path, kind)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                raise NotReadable(f"larger than {limit} bytes, not read")
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_backends_file(paths: list[Path], explicit: bool) -> SourceReport:
    """Blocking: read the first existing file of `paths`."""
    report = SourceReport(SourceName.FILE)
    for path in paths:
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1.
            text = read_capped(path).decode("utf-8-sig")
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there: the next place
        except NotReadable as exc:
            report.warnings.append(f"{path}: {exc}")
            return report
        except (OSError, UnicodeDecodeError) as exc:
            report.warnings.append(f"{path}: cannot read: {exc}")
            return report
        parsed = parse_lines(text, str(path), keep_per_kind=SHOWN_PER_KIND)
        report.warnings.extend(summarise(parsed, str(path)))
        for number, ep in parsed.good:
            report.sightings.append(Sighting(ep, SourceName.FILE, f"{path}:{number}"))
        return report
    if explicit:
        report.warnings.append(f"{paths[0]}: backends file not found")
    return report


def _settle(done: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if done.done():  # the caller stopped waiting
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)  # type: ignore[arg-type]  # T when there is no error


async def in_daemon_thread(work: Callable[[], T], timeout_s: float) -> T:
    """Run blocking `work` in a daemon thread and wait at most `timeout_s` (TimeoutError).

    Unlike asyncio.to_thread, a thread that never returns holds up nothing: not the caller
    (timeout, cancellation), not the loop's shutdown, not the interpreter's exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # handed to the waiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, done, result, error)

    threading.Thread(target=run, name="corral-file-read", daemon=True).start()
    return await asyncio.wait_for(done, timeout_s)


@dataclass
class FileSource:
    path: str | None = None
    timeout_s: float = READ_TIMEOUT_S
    name: SourceName = field(default=SourceName.FILE, init=False)

    async def collect(self) -> SourceReport:
        env = dict(os.environ)
        paths = candidate_paths(self.path, env, Path.cwd())
        explicit = bool(self.path or env.get("CORRAL_BACKENDS_FILE"))
        try:
            return await in_daemon_thread(
                lambda: read_backends_file(paths, explicit), self.timeout_s
            )
        except TimeoutError:
            report = SourceReport(SourceName.FILE)
            where = paths[0] if explicit else "backends file"
            report.warnings.append(f"{where}: not read in {self.timeout_s:g} s; skipped")
            return report
