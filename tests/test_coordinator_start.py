"""Starting right: adopt what already serves, use only ready backends, explain a failed load,
fall back to local devices (or wait), and drop a backend whose node stops its heartbeat.

A node's registrations expire by the store's clock, which the heartbeat test holds (FakeClock):
"three heartbeats missed" is a step of that clock, not a wait."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from corral.coordinator.runner import CoordinatorError
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.processes import find_coordinators
from corral.llama.server import ServerOptions, server_argv, server_env
from corral.llama.supervisor import Child, rpc_server_argv
from corral.rpc import protocol
from corral.store.base import EventKind, NodeRegistration
from corral.types import Status
from tests.support.clock import FakeClock
from tests.support.coordinator import Running, chat, health, running
from tests.support.loopback import free_port, next_loopback
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until


@contextlib.asynccontextmanager
async def fake_rpc_server(major: int) -> AsyncIterator[Endpoint]:
    """A stand-in for an RPC server of another protocol version: no such build exists here, so
    this (the one fake in these tests) answers HELLO with `major`.0.0 and nothing else."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readexactly(1 + 8 + protocol.CONN_CAPS_SIZE)
            reply = bytes([major, 0, 0, 0]) + bytes(protocol.CONN_CAPS_SIZE)
            writer.write(struct.pack("<Q", len(reply)) + reply)
            await writer.drain()
        writer.close()

    host = next_loopback()
    server = await asyncio.start_server(serve, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Endpoint(host, port)
    finally:
        server.close()
        await server.wait_closed()


async def test_only_ready_backends_join_and_an_incompatible_one_is_named(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    host = next_loopback()
    dead = Endpoint(host, free_port(host))  # nothing listens there
    async with (
        fake_rpc_server(protocol.CLIENT_PROTO_MAJOR + 1) as odd,
        running(tmp_path, llama_bins, tiny_model, [a, odd, dead], tensor_split=None) as c,
    ):
        rec = await c.wait_serving({a})
        assert rec.pid is not None
        argv = psutil.Process(rec.pid).cmdline()
        assert argv[argv.index("--rpc") + 1] == str(a)
        named = [w for w in c.warned if str(odd) in w]
        assert named and "incompatible" in named[0] and "will not be used" in named[0]
        await c.wait_event(EventKind.WARNING, where=lambda e: e.endpoint == odd)
        await chat(c.url)


async def test_adopts_a_llama_server_already_serving_the_port(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    port = free_port("127.0.0.1")
    opts = ServerOptions(port=port)
    foreign = Child(
        server_argv(llama_bins.llama_server, tiny_model, opts, [a]),
        tmp_path / "foreign.log",
        server_env(os.environ),
    )
    await foreign.start()
    try:
        await until(lambda: _is_200(opts.base_url), 20, "the foreign llama-server ready")
        # No --model: the adopted one's model is used for any later restart.
        async with running(tmp_path, llama_bins, None, [], port=port) as c:
            rec = await c.wait_serving({a})
            assert rec.pid == foreign.pid
            on_port = [x.pid for x in find_coordinators() if x.port == port]
            assert on_port == [foreign.pid]  # supervised, not doubled
            started = await c.wait_event(EventKind.COORDINATOR_STARTED)
            assert "adopted" in started.message
            await chat(c.url)
            # Supervised for real: when it dies, the coordinator starts its own in its place.
            os.kill(foreign.pid or 0, signal.SIGKILL)
            rec = await c.wait_serving({a}, other_than=foreign.pid)
            assert rec.model == str(tiny_model)
            await chat(c.url)
    finally:
        await foreign.stop(grace=3)


async def _is_200(url: str) -> bool:
    return await health(url) == 200


async def test_a_port_held_by_another_program_is_refused(
    llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(CoordinatorError, match="not llama-server"):
            async with running(tmp_path, llama_bins, tiny_model, [], port=port) as c:
                await asyncio.wait_for(c.task, 10)
    finally:
        server.close()
        await server.wait_closed()


async def test_death_while_loading_is_explained_and_retries_back_off(
    llama_bins: LlamaBinaries, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"garbage, not a GGUF file")
    async with running(tmp_path, llama_bins, bad, [], backoff_base_s=0.5) as c:

        async def failures() -> int:
            return len(await c.events(EventKind.COORDINATOR_FAILED))

        await until(lambda: _at_least(failures, 4), 15, "four failed starts")
        failed = await c.events(EventKind.COORDINATOR_FAILED)
        assert "while loading the model" in failed[0].message
        assert "invalid magic" in failed[0].message  # the reason, from its log
        gaps = [b.ts - a.ts for a, b in itertools.pairwise(failed)]
        assert gaps[1] >= 0.45 and gaps[2] >= 0.95, gaps  # 0, 0.5, 1.0 s: exponential
        rec = await c.record()
        assert rec.state in ("failed", "waiting", "starting")


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def test_no_ready_backend_serves_locally_then_moves_to_the_backend(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    host = next_loopback()
    later = Endpoint(host, free_port(host))
    async with running(tmp_path, llama_bins, tiny_model, [later], tensor_split=None) as c:
        await c.wait_serving(set())
        assert any("local devices alone" in w for w in c.warned)
        await chat(c.url)
        await rpc_server(later.host, later.port)
        await c.wait_serving({later})
        await chat(c.url)


async def test_without_local_fallback_it_waits_for_min_backends(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    host = next_loopback()
    later = Endpoint(host, free_port(host))
    async with running(
        tmp_path, llama_bins, tiny_model, [a, later], local_fallback=False, min_backends=2
    ) as c:
        await until(lambda: _state_is(c, "waiting"), 5, "state waiting")
        assert await c.pids() == set()
        assert await health(c.url) is None  # nothing serves the port
        # Started without waiting for it to probe ready: the coordinator takes it at once, and
        # from then on it is busy to anyone else.
        late = Child(
            rpc_server_argv(llama_bins.rpc_server, later.host, later.port, threads=1),
            tmp_path / "later.log",
        )
        await late.start()
        try:
            await c.wait_serving({a, later})
            await chat(c.url)
        finally:
            await late.stop(grace=3)


async def _state_is(c: Running, state: str) -> bool:
    rec = await c.store.coordinator()
    return rec is not None and rec.state == state


async def test_backend_whose_node_stops_heartbeating_is_dropped(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    """B is known only from its node's registration. The node agent is not run here: the test
    writes the registrations itself and then stops, as a node that vanished silently would."""
    a, _ = await rpc_server()
    b, _ = await rpc_server()
    clock = FakeClock()  # the store's: registrations expire when the test says time has passed
    async with running(tmp_path, llama_bins, tiny_model, [a], clock=clock) as c:
        beat = 0.2
        reg = NodeRegistration("node-b", b, "b-host", Status.READY, heartbeat_s=beat)
        await c.store.register_node(replace(reg, last_heartbeat=clock()))
        await c.wait_serving({a, b})
        clock.advance(3 * beat)  # three heartbeats missed: the registration is gone
        assert await c.store.live_nodes() == []
        rec = await c.wait_serving({a}, seconds=10)
        assert "heartbeat" in (rec.last_reason or "")
        await chat(c.url)
