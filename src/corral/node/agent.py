"""`corral node`: supervise (or attach to) the ggml-rpc-server beside it and announce it.

Every heartbeat the agent looks at the backend locally (process alive, the connected client),
probes its own address only while no client holds it (a held backend answers nobody else), and
publishes a registration: to the store (Redis or embedded), over HTTP to a dashboard when asked,
and on the local network by mDNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.processes import LocalView, find_listener, inspect, listens
from corral.llama.rpc_cache import (
    REFRESH_S,
    CacheGauge,
    account_home,
    process_cache_dir,
    rpc_cache_dir,
    shown_path,
)
from corral.llama.supervisor import Child, rpc_server_argv
from corral.net.mdns import MdnsAnnouncer, encode_txt
from corral.node.warm import Warmed, WarmError, warm_cache
from corral.rpc.probe import Prober
from corral.store.base import (
    DEFAULT_HEARTBEAT_S,
    Event,
    EventKind,
    NodeRegistration,
    Store,
)
from corral.types import Device, Status

log = logging.getLogger(__name__)

Publish = Callable[[NodeRegistration], Awaitable[None]]


@dataclass
class NodeConfig:
    endpoint: Endpoint
    node_id: str
    log_dir: Path
    attach: bool = False
    threads: int | None = None
    devices: str | None = None
    cache: bool = False
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    mdns: bool = True
    max_backoff_s: float = 30.0
    cache_refresh_s: float = REFRESH_S  # the cache's size is re-measured at most this often
    # Where others reach the backend, when `endpoint` binds every interface (0.0.0.0 or ::):
    # an unspecified address is a placeholder to every reader, so it is never published.
    advertise: Endpoint | None = None
    # A model to load into the backend once at start, so its cache holds it (node/warm.py).
    warm: Path | None = None

    @property
    def public(self) -> Endpoint:
        return self.advertise or self.endpoint


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def restart_delay(failures: int, max_s: float) -> float:
    """Pure: exponential backoff for crash restarts: 0.5, 1, 2, ... capped."""
    return float(min(max_s, 0.5 * (2 ** max(0, failures - 1))))


@dataclass
class NodeAgent:
    config: NodeConfig
    binaries: LlamaBinaries | None
    store: Store | None
    extra_publishers: list[Publish] = field(default_factory=list)
    prober: Prober = field(default_factory=lambda: Prober(timeout=1.0))
    child: Child | None = field(default=None, init=False)
    restarts: int = field(default=0, init=False)
    _pid: int | None = field(default=None, init=False)
    _failures: int = field(default=0, init=False)
    _next_start: float = field(default=0.0, init=False)
    _version: str | None = field(default=None, init=False)
    _devices: tuple[Device, ...] = field(default=(), init=False)
    _announcer: MdnsAnnouncer | None = field(default=None, init=False)
    _announced: dict[str, str] | None = field(default=None, init=False)
    _store_up: bool | None = field(default=None, init=False)
    _cache: CacheGauge | None = field(default=None, init=False)
    last: NodeRegistration | None = field(default=None, init=False)
    warming: asyncio.Task[Warmed | None] | None = field(default=None, init=False)
    # Set once a --warm has ended (`warmed`: what it did, None if it failed or was skipped).
    warm_done: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    warmed: Warmed | None = field(default=None, init=False)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._begin()
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                started = loop.time()
                await self.beat()
                # Beat on a fixed period: a slow beat must not stretch the gap between two
                # registrations towards the TTL (three beats), or a live node would flicker.
                wait = max(0.0, self.config.heartbeat_s - (loop.time() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await self._end()

    async def _begin(self) -> None:
        ep = self.config.public
        if self.config.attach:
            bind = self.config.endpoint
            self._pid = await asyncio.to_thread(find_listener, bind.port, bind.host)
            if self._pid is None:
                log.warning("node: no ggml-rpc-server listens on %s yet; will keep looking", ep)
        else:
            await self._start_child()
        await self._follow_cache()
        usage = await self._cache.measure_now() if self._cache is not None else None
        if self._cache is None:
            cache = "cache off"
        else:
            cache = f"cache {self._cache.directory} ({usage.describe() if usage else 'unread'})"
        log.info(
            "node %s: %s ggml-rpc-server on %s (pid %s)%s; %s; heartbeat every %gs",
            self.config.node_id,
            "attached to" if self.config.attach else "started",
            self.config.endpoint,
            self._pid,
            f", published as {ep}" if ep != self.config.endpoint else "",
            cache,
            self.config.heartbeat_s,
        )
        if self.config.warm is not None:
            # Beside the heartbeats: the node is registered (its backend busy) while it warms.
            self.warming = asyncio.create_task(self._warm(self.config.warm))
        if self.config.mdns and _is_loopback(ep.host):
            log.info("node: %s is a loopback address; not announced by mDNS", ep.host)
        elif self.config.mdns:
            try:
                self._announcer = MdnsAnnouncer(
                    ep, f"corral-{self.config.node_id[:8]}-{ep.port}", ep.host if ep.is_ip else None
                )
            except OSError as exc:
                log.warning("node: mDNS unavailable (%s); announcing through the store only", exc)

    async def _warm(self, model: Path) -> Warmed | None:
        """Load `model` into the backend once so its cache holds it; None when it cannot."""
        try:
            self.warmed = await self._warm_once(model)
        finally:
            self.warm_done.set()
        return self.warmed

    async def _warm_once(self, model: Path) -> Warmed | None:
        if self._cache is None or self.binaries is None:
            log.warning("node: --warm needs the backend's cache (-c) and llama-server; skipped")
            return None
        try:
            warmed = await warm_cache(
                self.binaries.llama_server,
                model,
                self.config.endpoint,
                self._cache.directory,
                self.config.log_dir / f"warm-{self.config.endpoint.port}.log",
                env=dict(os.environ),
            )
        except (WarmError, OSError) as exc:
            await self._event(EventKind.WARNING, f"node: warming {model.name} failed: {exc}")
            return None
        log.info("node %s: %s with %s", self.config.node_id, warmed.describe(), model.name)
        self._cache.refresh()
        return warmed

    async def _cache_dir(self) -> Path | None:
        """The backend's cache directory: ours when we start it with `-c` (it inherits our
        environment), read from the process when we attach to it."""
        if not self.config.attach:
            if not self.config.cache:
                return None
            home = await asyncio.to_thread(account_home, os.getuid())
            return rpc_cache_dir(os.environ, home)
        if self._pid is None:
            return None
        return await asyncio.to_thread(process_cache_dir, self._pid)

    async def _follow_cache(self) -> None:
        """Measure the directory the backend uses now (an attached one may change)."""
        directory = await self._cache_dir()
        if self._cache is not None and self._cache.directory == directory:
            return
        if self._cache is not None:
            await self._cache.close()
        self._cache = (
            None
            if directory is None
            else CacheGauge(directory, refresh_s=self.config.cache_refresh_s)
        )

    async def _start_child(self) -> None:
        if self.binaries is None:
            raise RuntimeError("node: no ggml-rpc-server binary to start")
        ep = self.config.endpoint
        self.child = Child(
            rpc_server_argv(
                self.binaries.rpc_server,
                ep.host,
                ep.port,
                threads=self.config.threads,
                cache=self.config.cache,
                devices=self.config.devices,
            ),
            self.config.log_dir / f"ggml-rpc-server-{ep.host}-{ep.port}.log",
        )
        await self.child.start()
        self._pid = self.child.pid
        await self._until_listening(self.config.heartbeat_s)

    async def _until_listening(self, seconds: float) -> None:
        """A fresh backend takes a moment to listen: let the next beat see it up, not offline.
        At most one beat, so the registration never goes unrefreshed for its TTL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        port = self.config.endpoint.port
        while loop.time() < deadline:
            if self.child is None or self.child.returncode is not None:
                return
            if await asyncio.to_thread(listens, self._pid, port):
                return
            await asyncio.sleep(0.02)

    async def _supervise(self) -> None:
        """Restart a crashed backend, with backoff so a crash loop does not spin."""
        if self.config.attach:
            if self._pid is None or not (await self._view()).alive:
                ep = self.config.endpoint
                self._pid = await asyncio.to_thread(find_listener, ep.port, ep.host)
                await self._follow_cache()
            return
        child = self.child
        if child is None or child.returncode is None:
            return
        now = time.monotonic()
        if self._next_start == 0.0:
            self._failures += 1
            delay = restart_delay(self._failures, self.config.max_backoff_s)
            self._next_start = now + delay
            await self._event(
                EventKind.WARNING,
                f"ggml-rpc-server on {self.config.endpoint} exited with {child.returncode};"
                f" restarting in {delay:.1f}s",
            )
        if now >= self._next_start:
            self._next_start = 0.0
            await self._start_child()
            self.restarts += 1
            log.info(
                "node: restarted ggml-rpc-server on %s (pid %s, restart %d)",
                self.config.endpoint,
                self._pid,
                self.restarts,
            )

    async def _view(self) -> LocalView:
        return await asyncio.to_thread(inspect, self._pid, self.config.endpoint.port)

    async def beat(self) -> NodeRegistration:
        await self._supervise()
        view = await self._view()
        status, error_client = await self._status(view)
        if status is Status.READY and view.uptime_s > 60:
            self._failures = 0  # healthy for a while: forget old crashes
        cache = self._cache
        if cache is not None:
            cache.refresh()  # in the background: this beat shows the last measure
        usage = cache.usage if cache is not None else None
        reg = NodeRegistration(
            node_id=self.config.node_id,
            endpoint=self.config.public,
            hostname=socket.gethostname(),
            status=status,
            version=self._version,
            devices=self._devices,
            client=error_client,
            uptime_s=view.uptime_s,
            restarts=self.restarts,
            heartbeat_s=self.config.heartbeat_s,
            cache_dir=None if cache is None else shown_path(str(cache.directory)),
            cache_bytes=None if usage is None else usage.bytes,
            cache_capped=usage is not None and usage.capped,
        )
        self.last = reg
        await self._publish(reg)
        return reg

    async def _status(self, view: LocalView) -> tuple[Status, str | None]:
        if not view.alive:
            return Status.OFFLINE, None
        if view.client is not None:
            return Status.BUSY, view.client
        result = await self.prober.probe(self.config.public)
        if result.status is Status.READY:
            self._version, self._devices = result.version, result.devices
        return result.status, None

    async def _publish(self, reg: NodeRegistration) -> None:
        # mDNS first: its update goes out while the store is written, so a reader who sees the
        # new status in the store (a test in another namespace, a dashboard) then finds it on
        # the network too, not the old announcement.
        await self._announce(reg)
        if self.store is not None:
            try:
                await self.store.register_node(reg)
            except Exception as exc:  # the store being down must not stop the heartbeat
                log.warning("node: heartbeat to store failed: %s", exc)
            self._report_store()
        for publish in self.extra_publishers:
            try:
                await publish(reg)
            except Exception as exc:
                log.warning("node: heartbeat publish failed: %s", exc)

    async def _announce(self, reg: NodeRegistration) -> None:
        if self._announcer is None:
            return
        devices = json.dumps(
            [[d.index, d.free_bytes, d.total_bytes] for d in reg.devices],
            separators=(",", ":"),
        )
        txt = encode_txt(
            {
                "version": reg.version,
                "node_id": reg.node_id,
                "status": str(reg.status),
                "client": reg.client,
                "devices": devices,
            }
        )
        if txt == self._announced:
            return  # multicast only what changed; the records' own TTLs keep them alive
        try:
            await self._announcer.update(txt)
        except Exception as exc:
            log.warning("node: mDNS announce failed: %s", exc)
            return
        if self._announced is None:
            log.info("node: announced %s on mDNS", self._announcer.name)
        self._announced = txt

    def _report_store(self) -> None:
        """Say what the store noticed (Redis gone, back, entries dropped): it only collects."""
        assert self.store is not None
        for warning in self.store.take_warnings():
            log.warning("store: %s", warning)
        up = self.store.shared_reachable()
        if up is not None and up != self._store_up:
            if up and self._store_up is not None:
                log.info("store: redis reachable again; registration caught up")
            self._store_up = up

    async def _event(self, kind: EventKind, message: str) -> None:
        log.warning("%s", message)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.add_event(Event(kind, message, self.config.public))

    async def _end(self) -> None:
        if self.warming is not None:  # its llama-server is stopped on the way out
            self.warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.warming
        if self._cache is not None:
            await self._cache.close()
        if self._announcer is not None:
            with contextlib.suppress(Exception):
                await self._announcer.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.unregister_node(self.config.node_id)
        if self.child is not None:
            await self.child.stop()
