"""Wiring for `corral node`: build the agent from options and run it until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from dataclasses import dataclass
from functools import partial

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.node.agent import NodeAgent, NodeConfig, Publish
from corral.node.local import node_id
from corral.paths import state_dir
from corral.store.base import NodeRegistration
from corral.store.factory import open_store


class NodeOptionsError(ValueError):
    pass


@dataclass
class NodeOptions:
    host: str
    port: int
    attach: bool = False
    allow_any_address: bool = False
    threads: int | None = None
    devices: str | None = None
    cache: bool = False
    heartbeat_s: float = 2.0
    mdns: bool = True
    redis_url: str | None = None
    register_url: str | None = None
    token: str | None = None


def check_bind_host(host: str, allow_any: bool) -> None:
    """Pure: the protocol has no authentication; never bind every interface unless asked."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise NodeOptionsError(f"--host {host!r}: give an interface address, not a name") from None
    if addr.is_unspecified and not allow_any:
        raise NodeOptionsError(
            f"--host {host}: binds every interface of an unauthenticated protocol; "
            "give one interface address, or pass --allow-any-address"
        )


async def run_node(opts: NodeOptions, binaries: LlamaBinaries | None) -> int:
    check_bind_host(opts.host, opts.allow_any_address)
    if not opts.attach and binaries is None:
        raise NodeOptionsError("no ggml-rpc-server to start: run `corral llama install`")
    directory = state_dir()
    store = await open_store(opts.redis_url, directory)
    publishers: list[Publish] = []
    if opts.register_url:
        from corral.web.client import post_heartbeat

        async def http_publish(url: str, token: str | None, reg: NodeRegistration) -> None:
            await post_heartbeat(url, token, reg)

        publishers.append(partial(http_publish, opts.register_url, opts.token))
    config = NodeConfig(
        endpoint=Endpoint(opts.host, opts.port),
        node_id=node_id(directory, opts.host, opts.port),
        log_dir=directory / "logs",
        attach=opts.attach,
        threads=opts.threads,
        devices=opts.devices,
        cache=opts.cache,
        heartbeat_s=opts.heartbeat_s,
        mdns=opts.mdns,
    )
    agent = NodeAgent(config, binaries, store, publishers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await store.close()
    return 0
