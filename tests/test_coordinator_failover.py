"""Failover and rejoin with a real llama-server over two real ggml-rpc-servers on loopback.

The tiny model is forced across both backends (--tensor-split 1,1), so losing either one breaks
llama-server for real. Proven here: a lost backend (killed, or silent under SIGSTOP) or a dead or
hung llama-server is a failover to what still answers; a backend that comes back rejoins only
after the debounce, in one restart, and a flapping one costs at most two; a planned restart
drains the requests in flight; named split weights stay with their backends.

Timing is read from the coordinator's own record of what it saw (tests/support/coordinator.py's
ObservedRunner, in its monotonic clock), and every wait is for an event it publishes. Every
process killed here was started by the test (or by the coordinator under test), and is killed
by its PID.
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
from tests.support.coordinator import chat, running, stream
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until


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
        started = await c.wait_event(EventKind.COORDINATOR_STARTED)
        assert started.data["backends"] == [str(a), str(b)]
        assert await c.events(EventKind.COORDINATOR_STARTED) == [started]


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
        rec = await c.wait_serving({a, b}, seconds=debounce + 10)
        assert await c.restarts() == 2
        # By the coordinator's own clock: B had been ready a whole debounce when it was taken.
        ready_since = c.runner.ready_runs(b)[-1][0]
        assert c.runner.server is not None
        assert c.runner.server.started_at - ready_since >= debounce, c.runner.ready_runs(b)
        await chat(c.url)
        # And no further restart follows: a few more looks, and nothing is waiting to join.
        await c.looks_pass(5)
        assert await c.restarts() == 2
        assert not c.runner.memory.ready_since, c.runner.memory


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
        failed = await c.wait_event(EventKind.COORDINATOR_FAILED)
        assert "killed by SIGKILL" in failed.message, failed
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
        child = b_child
        for flap in range(5):
            os.kill(child.pid or 0, signal.SIGKILL)
            # Down until the coordinator has seen it down (dropped, or no longer ready) ...
            await until(
                lambda: b not in c.runner.held and b not in c.runner.memory.ready_since,
                10,
                f"the coordinator seeing B down (flap {flap + 1})",
            )
            _, child = await rpc_server(b.host, b.port)
            # ... and up until it has seen it ready again.
            await until(
                lambda: b in c.runner.memory.ready_since,
                10,
                f"the coordinator seeing B ready (flap {flap + 1})",
            )
        # Every ready run but the last was cut short of the debounce: five flaps, one window.
        runs = c.runner.ready_runs(b)
        assert all(last - since < debounce for since, last in runs[:-1]), runs
        await c.wait_serving({a, b}, seconds=debounce + 10)
        await chat(c.url)
        assert await c.restarts() <= 2
        await c.looks_pass(5)
        assert await c.restarts() <= 2
        assert not c.runner.memory.ready_since, c.runner.memory


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
        await c.wait_serving({a, b_ep}, seconds=15)
        restarted = await c.wait_event(EventKind.COORDINATOR_RESTARTED)
        assert await c.events(EventKind.COORDINATOR_RESTARTED) == [restarted]
        # The restart to take B was a drain, begun while answers were still being written:
        # every one of them finished (above) before llama-server was stopped.
        [(action, in_flight)] = c.runner.stops
        assert action.drain and str(b_ep) in action.reason, action
        assert in_flight, "the restart began with nothing in flight: the drain was not tested"


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
