"""The node agent with real ggml-rpc-server processes and a real embedded store.

It starts its backend (or attaches to a running one) and registers what a probe sees, restarts
a crashed backend with a capped backoff, reports a held backend busy with its client (never
offline), unregisters when stopped, keeps its node id across restarts, and binds every
interface only when asked to.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.node.agent import NodeAgent, NodeConfig, restart_delay
from corral.node.identity import node_id
from corral.node.run import NodeOptionsError, check_bind_host
from corral.rpc import protocol as p
from corral.sources.registry import RegistrySource
from corral.store.base import NodeRegistration, Store
from corral.store.sqlite import EmbeddedStore
from corral.types import SourceName, Status
from tests.support.loopback import free_port, next_loopback
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

HEARTBEAT = 0.25


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EmbeddedStore]:
    s = await EmbeddedStore.open(tmp_path / "state.db")
    yield s
    await s.close()


RunAgent = Callable[..., Awaitable[NodeAgent]]


@pytest.fixture
async def run_agent(
    llama_bins: LlamaBinaries, store: EmbeddedStore, tmp_path: Path
) -> AsyncIterator[RunAgent]:
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(endpoint: Endpoint | None = None, attach: bool = False) -> NodeAgent:
        ep = endpoint or Endpoint(next_loopback(), 0)
        if ep.port == 0:
            ep = Endpoint(ep.host, free_port(ep.host))
        config = NodeConfig(
            endpoint=ep,
            node_id=node_id(tmp_path, ep.host, ep.port),
            log_dir=tmp_path / "logs",
            attach=attach,
            threads=1,
            heartbeat_s=HEARTBEAT,
            mdns=False,  # loopback has no multicast; mDNS is tested in namespaces
        )
        agent = NodeAgent(config, llama_bins, store)
        stop = asyncio.Event()
        stops.append((stop, asyncio.create_task(agent.run(stop))))
        return agent

    yield start
    for stop, task in stops:
        stop.set()
        await asyncio.wait_for(task, 15)


async def registration(
    store: Store, ep: Endpoint, want: Callable[[NodeRegistration], bool], seconds: float = 10
) -> NodeRegistration:
    """The node's registration, once it is live in the store and `want` accepts it."""
    last: list[NodeRegistration] = []

    async def registered() -> bool:
        last[:] = [n for n in await store.live_nodes() if n.endpoint == ep]
        return bool(last) and want(last[0])

    try:
        await until(registered, seconds, f"a matching registration of {ep}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last: {last}") from None
    return last[0]


async def test_agent_starts_backend_and_registers_what_it_sees(
    run_agent: RunAgent, store: EmbeddedStore
) -> None:
    agent = await run_agent()
    reg = await registration(store, agent.config.endpoint, lambda r: r.status is Status.READY)
    assert reg.version == "7.0.0"
    assert reg.devices and reg.devices[0].total_bytes > 0
    assert reg.client is None
    assert reg.node_id == agent.config.node_id
    assert agent.child is not None and agent.child.returncode is None


async def test_agent_restarts_a_crashed_backend(run_agent: RunAgent, store: EmbeddedStore) -> None:
    agent = await run_agent()
    ep = agent.config.endpoint
    await registration(store, ep, lambda r: r.status is Status.READY)
    assert agent.child is not None and agent.child.pid is not None
    first_pid = agent.child.pid
    os.kill(first_pid, signal.SIGKILL)
    reg = await registration(store, ep, lambda r: r.restarts == 1 and r.status is Status.READY)
    assert agent.child.pid != first_pid
    assert reg.version == "7.0.0"


async def test_held_backend_is_busy_with_its_client_not_offline(
    run_agent: RunAgent, store: EmbeddedStore
) -> None:
    agent = await run_agent()
    ep = agent.config.endpoint
    await registration(store, ep, lambda r: r.status is Status.READY)
    holder = socket.create_connection((ep.host, ep.port), timeout=2)
    try:
        holder.sendall(p.encode_hello())
        reply = b""
        while len(reply) < p.SIZE_FIELD + p.HELLO_REPLY_SIZE:  # may arrive in pieces
            chunk = holder.recv(64)
            assert chunk, "backend closed instead of answering HELLO"
            reply += chunk
        assert len(reply) == p.SIZE_FIELD + p.HELLO_REPLY_SIZE
        client = "{}:{}".format(*holder.getsockname())
        reg = await registration(store, ep, lambda r: r.status is Status.BUSY)
        assert reg.client == client
        report = await RegistrySource(store).collect()
        assert [s.endpoint for s in report.sightings] == [ep]
        assert report.sightings[0].source is SourceName.REGISTRY
        held = report.probes[str(ep)]
        assert held.status is Status.BUSY and held.error is not None and client in held.error
    finally:
        holder.close()
    await registration(store, ep, lambda r: r.status is Status.READY)


async def test_agent_attaches_to_a_running_backend(
    run_agent: RunAgent, rpc_server: StartRpc, store: EmbeddedStore
) -> None:
    ep, child = await rpc_server()
    agent = await run_agent(ep, attach=True)
    reg = await registration(store, ep, lambda r: r.status is Status.READY)
    assert agent.child is None  # attached, not started
    assert reg.uptime_s > 0
    assert child.returncode is None


async def test_stopped_agent_unregisters(run_agent: RunAgent, store: EmbeddedStore) -> None:
    agent = await run_agent()
    ep = agent.config.endpoint
    await registration(store, ep, lambda r: r.status is Status.READY)
    # Stop this one agent the way a signal would.
    agent_child = agent.child
    assert agent_child is not None
    await agent._end()
    assert [n for n in await store.live_nodes() if n.endpoint == ep] == []
    assert agent_child.returncode is not None


def test_restart_backoff_grows_and_is_capped() -> None:
    delays = [restart_delay(n, 30) for n in range(1, 10)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == 30


def test_node_id_is_stable_across_restarts(tmp_path: Path) -> None:
    first = node_id(tmp_path, "10.0.0.1", 50052)
    assert node_id(tmp_path, "10.0.0.1", 50052) == first
    assert node_id(tmp_path, "10.0.0.2", 50052) != first
    (tmp_path / "node-id-10.0.0.1-50052").write_text("junk")
    assert node_id(tmp_path, "10.0.0.1", 50052) != "junk"


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_binding_every_interface_needs_consent(host: str) -> None:
    with pytest.raises(NodeOptionsError, match="allow-any-address"):
        check_bind_host(host, allow_any=False)
    check_bind_host(host, allow_any=True)


def test_bind_host_must_be_an_address() -> None:
    with pytest.raises(NodeOptionsError, match="interface address"):
        check_bind_host("gpu-box", allow_any=False)
    check_bind_host("192.168.1.5", allow_any=False)
