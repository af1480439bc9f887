"""Source `file` against hostile backends files: what it reads is bounded in kind, size, line
length, endpoints and warnings, and no file can hang it or take the machine's memory.

Anything that could hang or grow without bound (a FIFO, /dev/zero, /dev/urandom) is read in a
child process with its address space capped and a bound on its run (tests/support/
bounded_child.py): a regression fails the test instead of hanging the run or the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from corral.endpoint import Endpoint
from corral.sources import file as file_source
from corral.sources.base import SourceReport
from corral.sources.file import (
    MAX_ENDPOINTS,
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    MAX_PARSED,
    SHOWN_PER_KIND,
    FileSource,
    parse_backends_file,
    read_backends_file,
    read_capped,
)
from corral.types import SourceName
from tests.support.bounded_child import run_bounded

# The whole source, as discovery runs it: FileSource.collect, in its own event loop.
COLLECT = """
import asyncio, json, sys, time
from corral.sources.file import FileSource
cpu, wall = time.process_time(), time.monotonic()
report = asyncio.run(FileSource(sys.argv[1]).collect())
print(json.dumps({
    "seconds": time.monotonic() - wall,
    "cpu": time.process_time() - cpu,
    "count": len(report.sightings),
    "warnings": report.warnings,
}))
"""


def collect_in_child(path: Path, code: str = COLLECT) -> dict[str, Any]:
    run = run_bounded(code, str(path), timeout_s=15)
    assert not run.timed_out, f"reading {path} did not finish in 15 s (killed)"
    assert run.code == 0, run.err[-2000:]
    assert run.maxrss_mb < 200, f"reading {path} took {run.maxrss_mb:.0f} MB"
    result: dict[str, Any] = json.loads(run.out)
    return result


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "rpc_backends.conf"
    os.mkfifo(path)
    return path


def _link(tmp_path: Path, target: str) -> Path:
    link = tmp_path / "rpc_backends.conf"
    link.symlink_to(target)
    return link


# ---- what is read at all ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kind"),
    [("/dev/zero", "a character device"), ("/dev/urandom", "a character device")],
)
def test_a_symlink_to_a_device_is_refused_at_once_naming_it(
    tmp_path: Path, target: str, kind: str
) -> None:
    link = _link(tmp_path, target)
    result = collect_in_child(link)
    assert result["count"] == 0
    assert result["warnings"] == [
        f"{link}: cannot read: it is {kind} ({target}), not a regular file"
    ]
    assert result["cpu"] < 1.0 and result["seconds"] < 1.0


def test_a_fifo_is_refused_without_waiting_for_a_writer(fifo: Path) -> None:
    result = collect_in_child(fifo)
    assert result["warnings"] == [
        f"{fifo}: cannot read: it is a FIFO (named pipe), not a regular file"
    ]
    assert result["count"] == 0 and result["seconds"] < 1.0


def test_a_fifo_swapped_in_after_the_check_cannot_block_the_open(fifo: Path) -> None:
    """stat says regular file (as it did a moment before the swap); the open must not block
    and the open descriptor is checked again."""
    code = """
import json, os, sys
from pathlib import Path
import corral.sources.file as f
real, regular = os.stat, os.stat(f.__file__)
os.stat = lambda p, *a, **k: regular if str(p) == sys.argv[1] else real(p, *a, **k)
report = f.read_backends_file([Path(sys.argv[1])], True)
print(json.dumps({"count": len(report.sightings), "warnings": report.warnings}))
"""
    result = collect_in_child(fifo, code)
    assert result["warnings"] == [
        f"{fifo}: cannot read: it is a FIFO (named pipe), not a regular file"
    ]


def test_directories_and_sockets_are_refused_naming_what_they_are(tmp_path: Path) -> None:
    directory = tmp_path / "dir.conf"
    directory.mkdir()
    report = read_backends_file([directory], explicit=True)
    assert report.warnings == [f"{directory}: cannot read: it is a directory, not a regular file"]
    sock_path = tmp_path / "sock.conf"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        report = read_backends_file([sock_path], explicit=True)
    assert report.warnings == [f"{sock_path}: cannot read: it is a socket, not a regular file"]


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    real = tmp_path / "real.conf"
    real.write_text("10.0.0.1:50052\n")
    link = _link(tmp_path, str(real))
    report = read_backends_file([link], explicit=True)
    assert [s.endpoint for s in report.sightings] == [Endpoint("10.0.0.1", 50052)]
    assert [s.detail for s in report.sightings] == [f"{link}:1"]
    assert report.warnings == []


def test_a_dangling_symlink_is_a_missing_file(tmp_path: Path) -> None:
    link = _link(tmp_path, str(tmp_path / "gone.conf"))
    assert read_backends_file([link], explicit=False).warnings == []
    assert read_backends_file([link], explicit=True).warnings == [
        f"{link}: backends file not found"
    ]


# ---- how much is read ------------------------------------------------------------------------


def test_the_size_cap_is_counted_while_reading_not_taken_from_stat(tmp_path: Path) -> None:
    """stat says 0 bytes (as for /proc files); 2 MiB are there: refused at the cap."""
    big = tmp_path / "big.conf"
    big.write_bytes(b"# padding\n" * (2 * MAX_FILE_BYTES // 10))
    code = """
import json, os, sys
from pathlib import Path
import corral.sources.file as f
real = os.stat
def empty(p, *a, **k):
    st = real(p, *a, **k)
    if str(p) != sys.argv[1]:
        return st
    fields = list(st)
    fields[6] = 0  # st_size
    return os.stat_result(fields)
os.stat = empty
report = f.read_backends_file([Path(sys.argv[1])], True)
print(json.dumps({"count": len(report.sightings), "warnings": report.warnings}))
"""
    result = collect_in_child(big, code)
    assert result["warnings"] == [f"{big}: larger than {MAX_FILE_BYTES} bytes, not read"]


def test_exactly_the_cap_is_read(tmp_path: Path) -> None:
    edge = tmp_path / "edge.conf"
    line = b"10.0.0.1:50052\n"
    edge.write_bytes(line + b"#" * (MAX_FILE_BYTES - len(line)))
    assert len(read_capped(edge)) == MAX_FILE_BYTES
    report = read_backends_file([edge], explicit=True)
    assert [s.endpoint for s in report.sightings] == [Endpoint("10.0.0.1", 50052)]
    assert report.warnings == [f"{edge}:2: longer than {MAX_LINE_BYTES} bytes"]


def test_a_long_line_is_skipped_and_the_rest_still_used(tmp_path: Path) -> None:
    conf = tmp_path / "rpc_backends.conf"
    long_line = "10.0.0.9:50052 #" + "x" * MAX_LINE_BYTES
    fits = "10.0.0.8:1 #" + "é" * ((MAX_LINE_BYTES - 12) // 2)  # 512 bytes in UTF-8
    conf.write_text(f"10.0.0.1:50052\n{long_line}\n{fits}\n10.0.0.2:50052\n")
    report = read_backends_file([conf], explicit=True)
    assert [s.endpoint for s in report.sightings] == [
        Endpoint("10.0.0.1", 50052),
        Endpoint("10.0.0.8", 1),
        Endpoint("10.0.0.2", 50052),
    ]
    assert report.warnings == [f"{conf}:2: longer than {MAX_LINE_BYTES} bytes"]


def _distinct(tmp_path: Path, count: int = 66_000) -> tuple[Path, list[str]]:
    conf = tmp_path / "rpc_backends.conf"
    lines = [f"127.0.0.{h}:{p}" for h in range(1, 8) for p in range(1, 10_000)][:count]
    conf.write_text("".join(f"{line}\n" for line in lines))
    assert conf.stat().st_size <= MAX_FILE_BYTES
    return conf, lines


def test_66000_distinct_endpoints_give_the_first_4096_and_one_warning(tmp_path: Path) -> None:
    conf, lines = _distinct(tmp_path)
    cpu = time.process_time()
    report = read_backends_file([conf], explicit=True)
    assert time.process_time() - cpu < 1.0
    assert len(report.sightings) == MAX_ENDPOINTS == 4096
    assert [str(s.endpoint) for s in report.sightings] == lines[:MAX_ENDPOINTS]
    assert report.warnings == [
        f"{conf}: more than 4,096 endpoints; the first 4,096 are used, 61,904 more lines dropped"
    ]


def test_66000_lines_through_the_whole_source_in_a_child(tmp_path: Path) -> None:
    conf, _ = _distinct(tmp_path)
    result = collect_in_child(conf)
    assert result["count"] == MAX_ENDPOINTS
    assert len(result["warnings"]) == 1 and result["cpu"] < 1.0


# ---- how much is said ------------------------------------------------------------------------


def test_100000_duplicate_lines_are_five_warnings_and_a_count(tmp_path: Path) -> None:
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text("10.0.0.1:5\n" * 60_000 + "[::1]:9\n" * 40_000)
    cpu = time.process_time()
    report = read_backends_file([conf], explicit=True)
    assert time.process_time() - cpu < 1.0
    assert [s.endpoint for s in report.sightings] == [
        Endpoint("10.0.0.1", 5),
        Endpoint("::1", 9),
    ]
    assert report.warnings == [
        *(f"{conf}:{n}: duplicate of an earlier line: '10.0.0.1:5'" for n in range(2, 7)),
        f"{conf}: and 99,993 more duplicate lines",
    ]


def test_each_kind_is_summarised_on_its_own_in_line_order(tmp_path: Path) -> None:
    conf = tmp_path / "rpc_backends.conf"
    rows = ["10.0.0.1:1"]
    for i in range(7):
        rows += [f"bad{i}:0", "10.0.0.1:1", "y" * (MAX_LINE_BYTES + 1)]
    conf.write_text("\n".join(rows) + "\n")
    report = read_backends_file([conf], explicit=True)
    placeholder = "port 0 is a placeholder, not a listening port"
    shown: list[str] = []
    for i in range(SHOWN_PER_KIND):
        first = 2 + 3 * i
        shown += [
            f"{conf}:{first}: {placeholder}: 'bad{i}:0'",
            f"{conf}:{first + 1}: duplicate of an earlier line: '10.0.0.1:1'",
            f"{conf}:{first + 2}: longer than {MAX_LINE_BYTES} bytes",
        ]
    assert report.warnings == [
        *shown,
        f"{conf}: and 2 more bad lines",
        f"{conf}: and 2 more duplicate lines",
        f"{conf}: and 2 more lines longer than {MAX_LINE_BYTES} bytes",
    ]


def test_a_megabyte_of_distinct_junk_is_parsed_only_so_far(tmp_path: Path) -> None:
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text("".join(f"[::{i:x}]:0\n" for i in range(100_000))[:MAX_FILE_BYTES])
    cpu = time.process_time()
    report = read_backends_file([conf], explicit=True)
    assert time.process_time() - cpu < 1.0
    assert report.sightings == []
    assert report.warnings[-2] == f"{conf}: and {MAX_PARSED - SHOWN_PER_KIND:,} more bad lines"
    assert report.warnings[-1].startswith(f"{conf}: more than {MAX_PARSED:,} different entries; ")
    assert report.warnings[-1].endswith(" more lines not read")


def test_the_pure_parser_still_reports_every_line() -> None:
    good, errors = parse_backends_file("a1:1\n" * 8, "f")
    assert good == [(1, Endpoint("a1", 1))]
    assert errors == [f"f:{n}: duplicate of an earlier line: 'a1:1'" for n in range(2, 9)]


# ---- how long it may take --------------------------------------------------------------------


async def test_a_read_that_hangs_is_given_up_in_time_and_holds_nothing_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A file system that never answers (a dead NFS server): collect gives up after its bound,
    and the stuck reader is a daemon thread (the process can still exit)."""
    release = threading.Event()
    readers: list[threading.Thread] = []

    def stuck(paths: list[Path], explicit: bool) -> SourceReport:
        readers.append(threading.current_thread())
        release.wait(30)
        return SourceReport(SourceName.FILE)

    monkeypatch.setattr(file_source, "read_backends_file", stuck)
    conf = tmp_path / "rpc_backends.conf"
    try:
        report = await asyncio.wait_for(FileSource(str(conf), timeout_s=0.3).collect(), 10)
        assert report.sightings == []
        assert report.warnings == [f"{conf}: not read in 0.3 s; skipped"]
        assert len(readers) == 1 and readers[0].daemon and readers[0].is_alive()
    finally:
        release.set()
    readers[0].join(10)
    assert not readers[0].is_alive()
