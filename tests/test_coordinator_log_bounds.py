"""llama-server's log stays bounded while it runs (at -lv 4 it logs forever, ~80 B/s idle), and
what is read back to explain an exit is bounded too.

The writer holds the log open for appending (O_APPEND), as llama-server's stdout does
(supervisor.Child opens it with "ab"): the trim must leave it writing at the new start. Its
writes are os.write() on that descriptor: done when they return, nothing to wait for.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.coordinator import process
from corral.coordinator.process import OwnedServer


def _server(log: Path) -> OwnedServer:
    return OwnedServer(["true"], log, {}, (), None)


def test_a_log_past_the_cap_is_copied_aside_and_emptied_in_place(tmp_path: Path) -> None:
    log = tmp_path / "llama-server.log"
    cap = 64 * 1024
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(out, b"x" * 100 + b"\n")
        server = _server(log)
        # Under the cap: nothing happens.
        assert not process._copy_truncate(log, cap)
        assert log.stat().st_size == 101 and not (tmp_path / "llama-server.log.1").exists()
        # Past it: the old content moves to .1, the log restarts, the writer goes on at its
        # new start (no hole of zeros where the old end was).
        for _ in range(cap // 100 + 5):
            os.write(out, b"y" * 99 + b"\n")
        old = log.read_bytes()
        assert process._copy_truncate(log, cap)
        assert (tmp_path / "llama-server.log.1").read_bytes() == old
        assert log.stat().st_size == 0
        os.write(out, b"after the trim\n")
        assert log.read_bytes() == b"after the trim\n"
        # The server's own trim does the same, and its log since start begins at the new start.
        server._log_offset = 5
        server.trim_log()  # under its 32 MiB cap: untouched
        assert server._log_offset == 5 and log.read_bytes() == b"after the trim\n"
    finally:
        os.close(out)


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
