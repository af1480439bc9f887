"""A model load has no deadline: a start fails when llama-server exits, or when its load moves
nothing for the stall timeout; meanwhile its progress is published.

The judge (coordinator/loading.py) is pure and tested at its edges with plain numbers. The
loads are real: a 540 MB model sent by a real llama-server to a real ggml-rpc-server, which the
tests stop (SIGSTOP) and let go (SIGCONT) to make the load stall or crawl. Where a load must
"take" minutes, the runner's load clock is a FakeClock the test moves: the bytes are real, only
the time between them is the test's.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from corral.coordinator.load_reader import read_load_sample
from corral.coordinator.loading import (
    READ_NOISE,
    RSS_NOISE,
    LoadSample,
    LoadWatch,
    ProgressLines,
    moved,
)
from corral.llama.binaries import LlamaBinaries
from corral.llama.supervisor import Child
from corral.net.sockdiag import parse_dump, read_tcp_bytes
from corral.store.base import EventKind
from corral.types import CoordinatorState
from tests.support.big_model import write_big_model
from tests.support.clock import FakeClock
from tests.support.coordinator import FAST, Running, running
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

MB = 1_000_000

# --- the judge, pure ---------------------------------------------------------------------------


def test_what_counts_as_moving() -> None:
    base = LoadSample(0.0, sent=100, received=10, rchar=5000, wchar=400, rss=50 * MB, log_bytes=7)
    assert not moved(base, replace(base, at=9.0)), "time passing alone is not progress"
    assert moved(base, replace(base, sent=101))
    assert moved(base, replace(base, received=11))
    assert moved(base, replace(base, log_bytes=8))
    # Our own /health polls make llama-server read and write a few bytes: not progress.
    assert not moved(base, replace(base, rchar=5000 + READ_NOISE - 1, wchar=400 + 300))
    assert moved(base, replace(base, rchar=5000 + READ_NOISE))
    assert moved(base, replace(base, wchar=400 + READ_NOISE))
    assert not moved(base, replace(base, rss=50 * MB + RSS_NOISE - 1))
    assert moved(base, replace(base, rss=50 * MB - RSS_NOISE)), "a freed buffer is movement too"
    unreadable = LoadSample(1.0)
    assert not moved(base, unreadable) and not moved(unreadable, base)


def test_a_load_stalls_exactly_at_the_timeout_after_its_last_progress() -> None:
    clock = FakeClock()
    watch = LoadWatch(stall_s=60.0, started_at=clock(), total_bytes=1000 * MB)
    watch.feed(LoadSample(clock(), sent=0))
    clock.advance(59.9)
    watch.feed(LoadSample(clock(), sent=0))
    assert watch.stalled() is None, "a tick before the timeout: not yet"
    clock.advance(0.1)
    watch.feed(LoadSample(clock(), sent=0))
    assert watch.stalled() is not None, "a llama-server that never moves stalls too"

    watch = LoadWatch(stall_s=60.0, started_at=clock(), total_bytes=1000 * MB)
    watch.feed(LoadSample(clock(), sent=0))
    for sent in range(1, 31):  # 30 steps of 10 s, each moving: 300 s with no stall
        clock.advance(10.0)
        watch.feed(LoadSample(clock(), sent=sent * 10 * MB))
        assert watch.stalled() is None, f"stalled while moving, at step {sent}"
    last = clock()
    clock.advance(59.0)
    watch.feed(LoadSample(clock(), sent=300 * MB))
    assert watch.stalled() is None
    clock.advance(1.0)
    watch.feed(LoadSample(clock(), sent=300 * MB))
    why = watch.stalled()
    assert why is not None and "no loading progress for 60 s" in why, why
    assert watch.progress_at == last


def test_progress_percent_rate_and_time_left() -> None:
    watch = LoadWatch(stall_s=60.0, started_at=0.0, total_bytes=2600 * MB)
    watch.feed(LoadSample(0.0, sent=0))  # outside the 5 s rate window once at 14 s
    watch.feed(LoadSample(10.0, sent=1000 * MB))
    watch.feed(LoadSample(12.0, sent=1000 * MB))
    watch.feed(LoadSample(14.0, sent=1170 * MB))
    p = watch.progress()
    assert (p.done_bytes, p.total_bytes) == (1170 * MB, 2600 * MB)
    assert p.rate_bps == pytest.approx(170 * MB / 4)  # 10 s .. 14 s
    assert p.eta_s == pytest.approx((2600 - 1170) * MB / (170 * MB / 4))
    assert p.text() == "loading model: 45% (1.2 of 2.6 GB sent, 42.5 MB/s, 34 s left)"
    assert LoadWatch(60.0, 0.0).progress().text() == "loading model: 0 B sent"
    local = LoadWatch(60.0, 0.0, total_bytes=500 * MB, remote=False)
    local.feed(LoadSample(0.0, rchar=0, rss=250 * MB))
    assert local.progress().text() == "loading model: 50% (250 of 500 MB read)"


def test_progress_lines_every_ten_percent_or_five_seconds() -> None:
    lines = ProgressLines()
    said = [
        t
        for t, pct in [
            (0.0, 0.0),
            (1.0, 5.0),
            (2.0, 10.0),
            (2.5, 19.0),
            (3.0, 20.5),
            (8.0, 21.0),
            (9.0, None),
            (13.0, None),
        ]
        if lines.due(t, pct)
    ]
    assert said == [0.0, 2.0, 3.0, 8.0, 13.0]


# --- the readers, on real sockets and processes ------------------------------------------------


def test_socket_bytes_come_from_the_kernel_per_connection() -> None:
    """send(2) is invisible to /proc/PID/io; the kernel's tcp_info counts it."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        peer, _ = server.accept()
        with peer:
            payload = os.urandom(300_000)
            client.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(peer.recv(1 << 20))
            peer.sendall(b"x" * 777)
            assert client.recv(1 << 10)
            inode, port = os.fstat(client.fileno()).st_ino, client.getsockname()[1]
            links = read_tcp_bytes([inode])
    assert links is not None and len(links) == 1, links
    (link,) = links
    assert link.inode == inode and link.local_port == port
    # tcp_info counts the SYN as one byte acked.
    assert link.sent - len(payload) in (0, 1) and link.received == 777, link


def test_a_malformed_diag_reply_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="truncated"):
        parse_dump(b"\xff\x00\x00\x00" + b"\x14\x00" + b"\x00" * 10)


# --- real loads --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """541 MB, 64 MiB feed-forward tensors: a load over loopback takes a few seconds."""
    return write_big_model(tmp_path_factory.mktemp("big") / "big.gguf", layers=2)


@contextmanager
def resumed_after(child: Child) -> Iterator[None]:
    """Whatever the test stops, the backend runs again before its fixture stops it."""
    try:
        yield
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGCONT)


async def load_under_way(c: Running, min_bytes: int = 0) -> LoadWatch:
    async def started() -> bool:
        watch = c.runner.load
        return watch is not None and watch.progress().done_bytes >= min_bytes

    await until(started, 30, f"a load with {min_bytes} bytes sent")
    watch = c.runner.load
    assert watch is not None
    return watch


@pytest.mark.llama
async def test_a_backend_stopped_mid_load_fails_the_start_naming_the_stall(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    stall = 3.0
    ep, backend = await rpc_server()
    assert backend.pid is not None
    timings = replace(FAST, stall_timeout_s=stall)
    async with running(
        tmp_path, llama_bins, big_model, [ep], timings=timings, tensor_split=None
    ) as c:
        with resumed_after(backend):
            await load_under_way(c, min_bytes=50 * MB)
            os.kill(backend.pid, signal.SIGSTOP)
            # The bound is the stall timeout plus a margin for a loaded machine; without the stall
            # rule llama-server would wait for its backend forever.
            failed = await c.wait_event(
                EventKind.COORDINATOR_FAILED,
                seconds=stall + 15,
                where=lambda e: "no loading progress" in e.message,
            )
        assert f"made no loading progress for {stall:g} s" in failed.message, failed.message
        sent = re.search(r"loading model: (\d+)% \(", failed.message)
        assert sent and 0 < int(sent.group(1)) < 100, f"not named mid-load: {failed.message}"
        said = [line for line in c.said if line.startswith("loading model:")]
        assert said, f"no progress line told: {c.said}"


async def drive(
    c: Running, watch: LoadWatch, clock: FakeClock, backend: Child, step: float, moving: bool
) -> int:
    """Move the load clock `step` at a time until the load ends; with `moving`, let the stopped
    backend run after each step until the runner has seen the load move at the new time. Returns
    the number of steps."""
    assert backend.pid is not None
    steps = 0
    while c.runner.load is watch:
        clock.advance(step)
        steps += 1
        if moving:
            os.kill(backend.pid, signal.SIGCONT)
        await until(
            lambda: (
                c.runner.load is not watch
                or (watch.progress_at if moving else watch.seen_at) == clock.now
            ),
            30,
            f"the runner's look at load clock +{clock.now - watch.started_at:g} s",
        )
        if moving:
            os.kill(backend.pid, signal.SIGSTOP)
        assert steps < 1000, "the load never ended"
    return steps


@pytest.mark.llama
async def test_a_slow_moving_load_longer_than_any_deadline_reaches_serving(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    """Driven: the backend runs only in short bursts, one per 45 s of the runner's load clock,
    so a real load "takes" minutes while it keeps moving (the old start timeout was 120 s)."""
    ep, backend = await rpc_server()
    assert backend.pid is not None
    clock = FakeClock()
    timings = replace(FAST, stall_timeout_s=60.0)
    async with running(
        tmp_path, llama_bins, big_model, [ep], timings=timings, tensor_split=None, load_clock=clock
    ) as c:
        with resumed_after(backend):
            watch = await load_under_way(c)
            os.kill(backend.pid, signal.SIGSTOP)
            steps = await drive(c, watch, clock, backend, step=45.0, moving=True)
        took = watch.seen_at - watch.started_at
        await c.wait_serving([ep], seconds=30)
        assert took >= 150, f"the load took only {took:g} s of load clock in {steps} steps"
        assert not await c.events(EventKind.COORDINATOR_FAILED)
        percents = [
            int(m.group(1)) for line in c.said if (m := re.match(r"loading model: (\d+)%", line))
        ]
        assert any(0 < p < 100 for p in percents), f"no progress told mid-load: {c.said}"


@pytest.mark.llama
async def test_the_same_clock_without_progress_fails_the_start(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    """The counter-test: the same driven clock and timings, and a backend that stays stopped."""
    ep, backend = await rpc_server()
    assert backend.pid is not None
    clock = FakeClock()
    timings = replace(FAST, stall_timeout_s=60.0)
    async with running(
        tmp_path, llama_bins, big_model, [ep], timings=timings, tensor_split=None, load_clock=clock
    ) as c:
        with resumed_after(backend):
            watch = await load_under_way(c)
            os.kill(backend.pid, signal.SIGSTOP)
            rec = await c.record()
            steps = await drive(c, watch, clock, backend, step=45.0, moving=False)
            failed = await c.wait_event(EventKind.COORDINATOR_FAILED, seconds=10)
        # It failed at its first look past 60 s without progress (bytes already on their way
        # when the backend stopped may still count as progress at the first step).
        quiet = watch.seen_at - watch.progress_at
        assert 60 <= quiet < 60 + 45, f"failed after {quiet:g} s without progress, {steps} steps"
        assert "made no loading progress for 60 s" in failed.message, failed.message
        assert rec.state is CoordinatorState.STARTING
        assert (await c.record()).state is not CoordinatorState.SERVING


@pytest.mark.llama
async def test_load_samples_of_a_real_load_show_bytes_sent_not_wchar(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    """The measure itself: while the backend receives the tensors, bytes sent grow well past
    anything /proc/PID/io's wchar shows (send(2) is not counted there)."""
    ep, _ = await rpc_server()
    size = (await asyncio.to_thread(big_model.stat)).st_size
    async with running(tmp_path, llama_bins, big_model, [ep], tensor_split=None) as c:
        watch = await load_under_way(c, min_bytes=100 * MB)
        server = c.runner.server
        assert server is not None
        sample = await asyncio.to_thread(read_load_sample, server.pid, None, c.runner.opts.port, 0)
        await c.wait_serving([ep], seconds=60)
    assert sample.sent is not None and sample.sent >= 100 * MB, sample
    assert sample.wchar is not None and sample.wchar < sample.sent // 100, sample
    # What is to cross the link: the weights the plan put on the backend (the token
    # embeddings stay on this host), within the file's size.
    plan = c.runner.plan
    assert plan is not None
    assert watch.total_bytes == sum(d.weights for d in plan.backends)
    assert 0.9 * size < watch.total_bytes < size
