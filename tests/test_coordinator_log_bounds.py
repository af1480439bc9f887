"""llama-server's log stays bounded while it runs (at -lv 4 it logs forever, ~80 B/s idle), and
what is read back to explain an exit is bounded too.

A real process appends to the log through an O_APPEND descriptor, as llama-server's stdout does
(supervisor.Child opens it with "ab"); the trim must leave that writer writing at the new start.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from corral.coordinator import process
from corral.coordinator.process import OwnedServer

ECHO = "import sys\nfor line in sys.stdin: print(line, end='', flush=True)"


def _server(log: Path) -> OwnedServer:
    return OwnedServer(["true"], log, {}, (), None)


def test_a_log_past_the_cap_is_copied_aside_and_emptied_in_place(tmp_path: Path) -> None:
    log = tmp_path / "llama-server.log"
    cap = 64 * 1024
    with log.open("ab") as out:
        # A writer holding the file open for appending, like llama-server's stdout.
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys\nfor line in sys.stdin: print(line, end='', flush=True)",
            ],
            stdin=subprocess.PIPE,
            stdout=out,
            text=True,
        )
    assert writer.stdin is not None
    try:
        writer.stdin.write("x" * 100 + "\n")
        writer.stdin.flush()
        server = _server(log)
        server._log_offset = 0
        # Under the cap: nothing happens.
        _wait_size(log, 101)
        process._copy_truncate(log, cap)
        assert log.stat().st_size == 101 and not (tmp_path / "llama-server.log.1").exists()
        # Past it: the old content moves to .1, the log restarts, the writer goes on at its
        # new start (no hole of zeros where the old end was).
        for _ in range(cap // 100 + 5):
            writer.stdin.write("y" * 99 + "\n")
        writer.stdin.flush()
        _wait_size(log, 101 + (cap // 100 + 5) * 100)
        old_size = log.stat().st_size
        assert process._copy_truncate(log, cap)
        assert (tmp_path / "llama-server.log.1").stat().st_size == old_size
        assert log.stat().st_size == 0
        writer.stdin.write("after the trim\n")
        writer.stdin.flush()
        _wait_size(log, len("after the trim\n"))
        assert log.read_bytes() == b"after the trim\n"
    finally:
        writer.stdin.close()
        writer.wait(10)


def _wait_size(path: Path, size: int) -> None:
    """Wait for the writer's bytes (it flushes each line; the pipe is the only delay)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.stat().st_size >= size:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {size} bytes (has {path.stat().st_size})")


def test_the_log_read_to_explain_an_exit_is_its_head_and_tail(tmp_path: Path) -> None:
    log = tmp_path / "llama-server.log"
    earlier = b"an earlier run\n" * 10
    first = b"error: the first cause\n"
    middle = b"m" * 99 + b"\n"
    last = b"terminate called: how it ended\n"
    log.write_bytes(earlier + first + middle * 20_000 + last)
    server = _server(log)
    server._log_offset = len(earlier)
    text = server.log_since_start()
    assert len(text.encode()) <= process.LOG_EXPLAIN_BYTES + 100
    assert text.startswith("error: the first cause")
    assert text.rstrip().endswith("how it ended")
    assert "bytes of the log left out" in text
    assert "an earlier run" not in text
    # A short run's log comes back whole.
    log.write_bytes(earlier + first + last)
    assert server.log_since_start() == (first + last).decode()
