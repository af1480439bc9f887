"""Run a node: build the agent from its options and run it until a signal (`corral node`)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.net.neighbours import local_addresses
from corral.net.notify import Notifier
from corral.node.agent import NodeAgent, NodeConfig, Publish
from corral.node.identity import node_id
from corral.node.readiness import NodeReadiness
from corral.paths import state_dir
from corral.rpc.probe import Prober
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
    cache: bool = True  # rpc-server's tensor cache (-c): a reload skips the weights it has
    heartbeat_s: float = 2.0
    mdns: bool = True
    redis_url: str | None = None
    register_url: str | None = None
    token: str | None = None
    warm: Path | None = None  # a model (local file) to load into the backend once at start


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


def advertise_host(bind_host: str, addresses: Iterable[str]) -> str:
    """Pure: the address to publish for a backend bound to `bind_host`.

    A concrete address is itself. Every interface (0.0.0.0 / ::) is published as this machine's
    first global address of that family (sorted, so it stays the same across restarts), else
    loopback: an unspecified address is a placeholder to every reader and is never published.
    """
    addr = ipaddress.ip_address(bind_host)
    if not addr.is_unspecified:
        return bind_host
    usable = []
    for text in addresses:
        try:
            cand = ipaddress.ip_address(text)
        except ValueError:
            continue
        if cand.version == addr.version and not (
            cand.is_loopback or cand.is_link_local or cand.is_unspecified or cand.is_multicast
        ):
            usable.append(cand)
    if not usable:
        return "127.0.0.1" if addr.version == 4 else "::1"
    return str(min(usable))


def probe_timeout(heartbeat_s: float) -> float:
    """Pure: a probe of the node's own backend must fit in one beat, or a slow backend would
    stretch the gap between registrations past their TTL (three beats) and the node flicker."""
    return max(0.1, min(1.0, heartbeat_s))


async def run_node(
    opts: NodeOptions, binaries: LlamaBinaries | None, notifier: Notifier | None = None
) -> int:
    """Raises NodeOptionsError (or ValueError, a bad Redis URL) before it starts anything.
    With a `notifier` (run as a systemd service) it says READY=1 once the backend serves."""
    check_bind_host(opts.host, opts.allow_any_address)
    if not opts.attach and binaries is None:
        raise NodeOptionsError("no ggml-rpc-server to start: run `corral llama install`")
    directory = state_dir()
    store = await open_store(opts.redis_url, directory)
    publishers: list[Publish] = []
    if opts.register_url:
        from corral.node.heartbeat import post_heartbeat

        async def http_publish(url: str, token: str | None, reg: NodeRegistration) -> None:
            await post_heartbeat(url, token, reg)

        publishers.append(partial(http_publish, opts.register_url, opts.token))
    if notifier is not None:
        publishers.append(NodeReadiness(notifier))
    public = advertise_host(opts.host, await asyncio.to_thread(local_addresses))
    config = NodeConfig(
        endpoint=Endpoint(opts.host, opts.port),
        advertise=Endpoint(public, opts.port) if public != opts.host else None,
        node_id=node_id(directory, opts.host, opts.port),
        log_dir=directory / "logs",
        attach=opts.attach,
        threads=opts.threads,
        devices=opts.devices,
        cache=opts.cache,
        heartbeat_s=opts.heartbeat_s,
        mdns=opts.mdns,
        warm=opts.warm,
    )
    agent = NodeAgent(
        config, binaries, store, publishers, prober=Prober(timeout=probe_timeout(opts.heartbeat_s))
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        if notifier is not None:  # before the backend and the store take their time
            notifier.stopping()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping)
    try:
        await agent.run(stop)
    finally:
        if notifier is not None:
            notifier.stopping()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await store.close()
    return 0
