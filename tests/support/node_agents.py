"""A real NodeAgent in a test: a real ggml-rpc-server with its tensor cache on, on a fresh
loopback address, no mDNS, the cache re-measured often; stopped when the block ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.node.agent import NodeAgent, NodeConfig
from corral.node.identity import node_id
from corral.store.base import Store
from tests.support.loopback import free_port, next_loopback


@asynccontextmanager
async def cached_node(
    binaries: LlamaBinaries,
    tmp_path: Path,
    store: Store | None,
    *,
    heartbeat_s: float,
    warm: Path | None = None,
) -> AsyncIterator[NodeAgent]:
    host = next_loopback()
    ep = Endpoint(host, free_port(host))
    config = NodeConfig(
        endpoint=ep,
        node_id=node_id(tmp_path, ep.host, ep.port),
        log_dir=tmp_path / "logs",
        threads=1,
        cache=True,
        heartbeat_s=heartbeat_s,
        mdns=False,
        cache_refresh_s=0.2,  # the default 30 s would make a test wait that long
        warm=warm,
    )
    agent = NodeAgent(config, binaries, store)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
