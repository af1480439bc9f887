"""Failover and rejoin with a real llama-server over two real ggml-rpc-servers on loopback.

The tiny model is forced across both backends (--tensor-split 1,1), so losing either one breaks
llama-server for real. Every process killed here was started by the test (or by the coordinator
under test), and is killed by its PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil

from corral.llama.binaries import LlamaBinaries
from corral.store.base import BackendRecord, EventKind
from corral.types import Status
from tests.conftest import StartRpc
from tests.coordinator_support import chat, running, stream, until


async def test_chat_across_both_backends(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    b, _ = await rpc_server()
    async with running(tmp_path, llama_bins, tiny_model, [a, b]) as c:
        rec = await c.wait_serving({a, b})
        reply = await chat(c.url)
        assert reply["usage"]["completion_tokens"] > 0
        assert rec.pid is not None and rec.model == str(tiny_model)
        # The process really holds both: its command line and its connections say so.
        proc = psutil.Process(rec.pid)
        argv = proc.cmdline()
        assert argv[argv.index("--rpc") + 1] == f"{a},{b}"
        assert "--metrics" in argv and argv[argv.index("--tensor-split") + 1] == "1,1"
        peers = {(x.raddr.ip, x.raddr.port) for x in proc.net_connections("tcp") if x.raddr}
        assert {(a.host, a.port), (b.host, b.port)} <= peers
        started = await c.events(EventKind.COORDINATOR_STARTED)
        assert len(started) == 1 and started[0].data["backends"] == [str(a), str(b)]


async def test_backend_killed_mid_stream_fails_over_then_rejoins_with_one_restart(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    b, b_child = await rpc_server()
    assert b_child.pid is not None
    debounce = 1.5
    async with running(tmp_path, llama_bins, tiny_model, [a, b], debounce_s=debounce) as c:
        first = await c.wait_serving({a, b})
        await chat(c.url)

        # A long answer is streaming when B dies.
        streaming = asyncio.Event()
        killed_at = 0.0

        def kill_b() -> None:
            nonlocal killed_at
            os.kill(b_child.pid or 0, signal.SIGKILL)
            killed_at = time.monotonic()
            streaming.set()

        result = await asyncio.wait_for(stream(c.url, 480, on_first=kill_b), 15)
        assert streaming.is_set()
        assert not result.finished and result.error, result  # an error, not a hang
        assert result.ended_at - killed_at < 5.0

        rec = await c.wait_serving({a}, other_than=first.pid)
        await chat(c.url)
        failover_s = time.monotonic() - killed_at
        assert failover_s < 5.0
        assert "backend" in (rec.last_reason or "") and str(b) in (rec.last_reason or "")
        assert await c.restarts() == 1

        # B comes back on the same address: included again after the debounce, in ONE restart.
        await rpc_server(b.host, b.port)
        back_at = time.monotonic()
        rec = await c.wait_serving({a, b}, seconds=10)
        assert time.monotonic() - back_at >= debounce
        assert await c.restarts() == 2
        await chat(c.url)
        await asyncio.sleep(debounce + 0.5)  # and no further restart follows
        assert await c.restarts() == 2


async def test_llama_server_killed_is_restarted(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    b, _ = await rpc_server()
    async with running(tmp_path, llama_bins, tiny_model, [a, b]) as c:
        first = await c.wait_serving({a, b})
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)  # the coordinator under test started it
        second = await c.wait_serving({a, b}, other_than=first.pid)
        await chat(c.url)
        failed = await c.events(EventKind.COORDINATOR_FAILED)
        assert failed and "killed by SIGKILL" in failed[-1].message
        assert second.restarts == 1


async def test_named_split_weights_stay_with_their_backends_after_a_failover(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, a_child = await rpc_server()
    b, _ = await rpc_server()
    c_, _ = await rpc_server()
    first_ep, second, third = sorted([a, b, c_])  # llama-server's --rpc order
    split = f"{a}=2,{b}=1,{c_}=1"
    async with running(tmp_path, llama_bins, tiny_model, [a, b, c_], tensor_split=split) as c:
        first = await c.wait_serving({a, b, c_})
        await chat(c.url)
        assert first.pid is not None
        weights = {a: "2", b: "1", c_: "1"}
        assert _split_of(first.pid) == ",".join(weights[e] for e in (first_ep, second, third))

        os.kill(a_child.pid or 0, signal.SIGKILL)  # the backend this test started
        survivors = await c.wait_serving({b, c_}, other_than=first.pid)
        await chat(c.url)
        assert survivors.pid is not None
        # B and C keep their own weights; a positional "2,1,1" would have given B A's 2.
        assert _split_of(survivors.pid) == "1,1"


def _split_of(pid: int) -> str:
    argv = psutil.Process(pid).cmdline()
    return argv[argv.index("--tensor-split") + 1]


async def test_flapping_backend_costs_at_most_two_restarts(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    b, b_child = await rpc_server()
    debounce = 5.0
    async with running(tmp_path, llama_bins, tiny_model, [a, b], debounce_s=debounce) as c:
        await c.wait_serving({a, b})
        began = time.monotonic()
        child = b_child
        for _ in range(5):
            os.kill(child.pid or 0, signal.SIGKILL)
            await asyncio.sleep(0.3)  # down long enough for a probe to see it
            _, child = await rpc_server(b.host, b.port)
            await asyncio.sleep(0.3)
        assert time.monotonic() - began < debounce  # five flaps inside one debounce window
        await c.wait_serving({a, b}, seconds=debounce + 5)
        await chat(c.url)
        assert await c.restarts() <= 2
        await asyncio.sleep(1.0)
        assert await c.restarts() <= 2


async def test_planned_restart_drains_requests_in_flight(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    b_ep = None
    async with running(tmp_path, llama_bins, tiny_model, [a], debounce_s=1.0) as c:
        await c.wait_serving({a})
        # One slot, eight long answers: seven wait their turn (deferred), ~2-3 s of work.
        b_ep, _ = await rpc_server()
        # B is not on the coordinator's list: it learns of it from the store (as the monitor
        # would write it).
        await c.store.put_backends([BackendRecord(b_ep, Status.READY)])
        await until(lambda: b_ep in c.runner.memory.ready_since, 5, "B seen ready")
        results = await asyncio.gather(*(stream(c.url, 480, seconds=30) for _ in range(8)))
        assert all(r.finished for r in results), [r.error for r in results]
        last_done = max(r.ended_at for r in results)
        await c.wait_serving({a, b_ep}, seconds=15)
        restarted = await c.events(EventKind.COORDINATOR_RESTARTED)
        assert len(restarted) == 1
        # The restart came only after the last answer was complete (wall clock vs monotonic:
        # compare through the offset between them).
        offset = time.time() - time.monotonic()
        assert restarted[0].ts >= last_done + offset - 0.05


async def test_llama_server_that_stops_answering_is_replaced(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    async with running(tmp_path, llama_bins, tiny_model, [a], unhealthy_after_s=1.0) as c:
        first = await c.wait_serving({a})
        assert first.pid is not None
        os.kill(first.pid, signal.SIGSTOP)  # a real hang: alive, holding its port, silent
        stopped_at = time.monotonic()
        second = await c.wait_serving({a}, other_than=first.pid, seconds=10)
        assert time.monotonic() - stopped_at >= 1.0
        assert "/health" in (second.last_reason or "")
        await chat(c.url)


async def test_backend_in_use_that_goes_silent_is_dropped(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    """SIGSTOP: the backend keeps its connection open and its port listening, and answers
    nothing. Only the lack of progress of the request in flight can tell."""
    a, _ = await rpc_server()
    b, b_child = await rpc_server()
    assert b_child.pid is not None
    async with running(tmp_path, llama_bins, tiny_model, [a, b], stall_after_s=2.0) as c:
        first = await c.wait_serving({a, b})
        os.kill(b_child.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            result = await asyncio.wait_for(stream(c.url, 480, seconds=30), 20)
            assert not result.finished and result.error, result  # ends, with an error
            rec = await c.wait_serving({a}, other_than=first.pid, seconds=10)
            assert "no progress" in (rec.last_reason or "")
            assert time.monotonic() - began < 10
            await chat(c.url)
        finally:
            os.kill(b_child.pid, signal.SIGCONT)
