"""The background loop that keeps the store true.

- every `recheck_s` it re-checks each known backend: a fresh probe for the free ones; for the
  ones the coordinator holds, no connection at all (they serve one client): a local backend is
  checked by its listening socket, a remote one by its node's heartbeat;
- every `discover_s` (or on demand, or when a node registers) it runs the whole discovery chain;
- it writes what it learns to the store as BackendRecords, with an event for every backend that
  appears, changes status or disappears. Everything that shows reads from there;
- it forgets a backend that has neither answered a probe nor been seen by any source but the
  cache (the store's own last view, which would otherwise keep it forever) for `forget_after_s`
  (`--forget-after`, 24 h), with a `backend_disappeared` event saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial

from corral.discovery import Discovery, DiscoveryResult
from corral.endpoint import Endpoint
from corral.llama.processes import local_listener_state
from corral.net.pacing import staggered
from corral.rpc.held import HeldBackends
from corral.rpc.probe import BUSY_MEMORY_S, Prober
from corral.store.base import BackendRecord, Event, EventKind, NodeRegistration, Store
from corral.types import Backend, ProbeResult, SourceName, Status

log = logging.getLogger(__name__)

ANSWERED = frozenset({Status.READY, Status.BUSY, Status.INCOMPATIBLE, Status.NOT_RPC})
DEFAULT_FORGET_AFTER_S = 24 * 3600.0
DEFAULT_MAX_BACKENDS = 4096
# What `news` compares: all but when it was last seen and how fast it answered.
_NEWS_FIELDS = tuple(
    f.name for f in fields(BackendRecord) if f.name not in ("last_seen", "latency_ms")
)
DEFAULT_OFFLINE_RECHECK_MAX_S = 30.0
OFFLINE_FULL_PACE = 5  # misses in a row before an offline backend's rechecks back off
PROBE_STAGGER_S = 0.002  # between the starts of one recheck's (or discovery's) probes


def next_record(
    old: BackendRecord | None,
    result: ProbeResult,
    sources: tuple[SourceName, ...] | None,
    in_use: bool,
    now: float,
    names: tuple[Endpoint, ...] | None = None,
) -> BackendRecord:
    """Pure: the new view of one backend from the old one and a fresh observation."""
    return BackendRecord(
        endpoint=result.endpoint,
        status=result.status,
        version=result.version or (old.version if old and result.status is Status.BUSY else None),
        devices=result.devices or (old.devices if old and result.status is Status.BUSY else ()),
        sources=sources if sources is not None else (old.sources if old else ()),
        latency_ms=result.latency_ms,
        error=result.error,
        first_seen=old.first_seen if old else now,
        last_seen=now if result.status in ANSWERED else (old.last_seen if old else now),
        in_use=in_use,
        client=old.client if old and in_use else None,
        names=names if names is not None else (old.names if old else ()),
    )


def change_event(old: BackendRecord | None, new: BackendRecord) -> Event | None:
    """Pure: the event a change of view deserves, if any."""
    if old is None:
        return Event(
            EventKind.BACKEND_APPEARED,
            f"{new.endpoint} appeared ({new.status}; sources: "
            f"{','.join(map(str, new.sources)) or '-'})",
            new.endpoint,
            data={"status": str(new.status)},
        )
    if old.status is not new.status:
        why = f": {new.error}" if new.error else ""
        return Event(
            EventKind.BACKEND_STATUS,
            f"{new.endpoint} {old.status} -> {new.status}{why}",
            new.endpoint,
            data={"from": str(old.status), "to": str(new.status)},
        )
    return None


def news(old: BackendRecord | None, new: BackendRecord) -> bool:
    """Pure: does `new` say more than `old` besides when it was last seen and how fast it
    answered (those are written at a slower pace)?"""
    if old is None:
        return True
    # Field by field: two dataclasses.replace() per record cost ~10 ms a recheck at 200 records.
    return any(getattr(old, name) != getattr(new, name) for name in _NEWS_FIELDS)


def offline_recheck_after(misses: int, recheck_s: float, max_s: float) -> float:
    """Pure: after the `misses`-th recheck in a row that found a backend offline, how long until
    the next: the usual pace for the first OFFLINE_FULL_PACE misses (a backend restarting is
    seen at once), then doubling up to `max_s`."""
    extra = max(0, misses - OFFLINE_FULL_PACE)
    return min(max_s, recheck_s * 2.0 ** min(extra, 32))


def forget_reason(
    record: BackendRecord, sighted: float | None, now: float, forget_after_s: float
) -> str | None:
    """Pure: why the monitor should forget this backend now, or None to keep it.

    Kept while it is in use, answers probes, or a source other than the cache saw it (at
    `sighted`) within `forget_after_s`; `last_seen` is its last answer (or when it appeared).
    """
    if record.in_use or record.status in ANSWERED:
        return None
    unseen = now - max(record.last_seen, sighted if sighted is not None else record.last_seen)
    if unseen < forget_after_s:
        return None
    return (
        f"it has not answered and no source but the last known view has seen it for"
        f" {_span(unseen)} (--forget-after {forget_after_s:g} s)"
    )


def _span(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


@dataclass
class MonitorStats:
    scans: int = 0
    rechecks: int = 0
    last_scan_s: float = 0.0
    probe_latencies_ms: list[float] = field(default_factory=list)


@dataclass
class Monitor:
    store: Store
    prober: Prober
    make_discovery: Callable[[], Discovery]
    recheck_s: float = 2.0
    discover_s: float = 60.0
    # What the coordinator holds: the same object its prober reads. Without a coordinator in
    # this process the monitor owns it and keeps it from the store's CoordinatorRecord. With one,
    # the runner owns it (the record lags a restart, still naming the old set, which would make
    # the runner's own probes of freed backends read "held") and the monitor only reads it.
    held: HeldBackends = field(kw_only=True)
    runner_owns_held: bool = field(default=False, kw_only=True)
    # With the registry among the sources: a node that registers (or comes back) brings the
    # next discovery forward to the next recheck, instead of waiting up to `discover_s`.
    watch_nodes: bool = False
    stats: MonitorStats = field(default_factory=MonitorStats)
    # Retention: a backend unseen for this long is forgotten (forget_reason); `clock` is the
    # wall time of the records (last_seen) and of the sightings.
    forget_after_s: float = field(default=DEFAULT_FORGET_AFTER_S, kw_only=True)
    # A cap on backends kept: past it the offline ones unseen longest go first (a flood of
    # registrations from many addresses would otherwise grow the list for a day).
    max_backends: int = field(default=DEFAULT_MAX_BACKENDS, kw_only=True)
    clock: Callable[[], float] = field(default=time.time, kw_only=True)
    # A record whose only news is its last_seen and latency is written at this pace, not at
    # every recheck: rewriting hundreds of unchanged records every 2 s kept the store, and every
    # reader of it, busy (the API's p99 under a registration flood).
    rewrite_every_s: float = field(default=10.0, kw_only=True)
    rescan_gap_s: float = field(default=1.0, kw_only=True)  # between discoveries, at least
    # An offline backend's rechecks back off to this (offline_recheck_after): thousands of
    # dead endpoints probed every 2 s took a whole core.
    offline_recheck_max_s: float = field(default=DEFAULT_OFFLINE_RECHECK_MAX_S, kw_only=True)
    _misses: dict[Endpoint, tuple[int, float]] = field(default_factory=dict)  # (count, due)
    _written_at: dict[Endpoint, float] = field(default_factory=dict)  # clock() of the last put
    _sighted: dict[Endpoint, float] = field(default_factory=dict)  # last seen by a real source
    _nodes_seen: set[Endpoint] = field(default_factory=set)
    _view: dict[Endpoint, BackendRecord] = field(default_factory=dict)
    _rescan: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _scanned: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        if self.prober.held is not self.held:
            raise ValueError("the monitor's prober must read the held set the monitor is given")

    async def wait_scan(self, after: int = 0) -> int:
        """Wait until more than `after` discovery runs are complete, their results in the store;
        return the count. `after=monitor.stats.scans` taken before a request waits for the run
        that answers it."""
        async with self._scanned:
            await self._scanned.wait_for(lambda: self.stats.scans > after)
            return self.stats.scans

    def request_rescan(self) -> None:
        self._rescan.set()

    async def load(self) -> list[BackendRecord]:
        """Start from the store's last known view (stale until re-verified)."""
        records = await self.store.backends()
        for record in records:
            self._view[record.endpoint] = record
            recent = time.time() - record.last_seen < BUSY_MEMORY_S
            if record.status is Status.BUSY and not record.in_use and recent:
                # Its accept queue may be full from earlier probes: a timed-out connect to it
                # must still read as busy (see the facts file), also in a new process.
                self.prober.remember_busy(record.endpoint)
        return records

    async def run(self, stop: asyncio.Event) -> None:
        await self.load()
        tasks = [
            asyncio.create_task(self._discover_loop(stop)),
            asyncio.create_task(self._recheck_loop(stop)),
        ]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _discover_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Cleared before the run: a request made while it runs asks for one more.
            self._rescan.clear()
            try:
                await self.discover_once()
            except Exception as exc:  # keep watching; say what failed
                log.exception("monitor: discovery failed")
                await self._event(Event(EventKind.WARNING, f"discovery failed: {exc}"))
            ended = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), self.discover_s)
            # Asked again at once, and again (a flood of new registrations each asks): runs
            # back to back would probe every known backend over and over; one per gap does.
            await asyncio.sleep(max(0.0, self.rescan_gap_s - (time.monotonic() - ended)))

    async def _recheck_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.recheck_once()
            except Exception:
                log.exception("monitor: recheck failed")
            await asyncio.sleep(max(0.0, self.recheck_s - (time.monotonic() - started)))

    async def _held(self) -> set[Endpoint]:
        if not self.runner_owns_held:
            coord = await self.store.coordinator()
            holds = coord is not None and coord.state.holds_backends
            self.held.replace(coord.backends if coord is not None and holds else ())
        return set(self.held)

    async def discover_once(self) -> DiscoveryResult:
        held = await self._held()
        result = await self.make_discovery().run()
        for w in result.warnings:
            log.info("%s", w)  # the caller shows these; logged for long runs
        seen = {b.endpoint for b in result.backends}
        # Another name of a listed backend (an older record under it): one backend, one record.
        aliases = {n for b in result.backends for n in b.names}
        now = self.clock()
        for b in result.backends:
            if any(s is not SourceName.CACHE for s in b.sources):
                self._sighted[b.endpoint] = now
        async with self._lock:
            await self._apply(result.backends, held)
            await self._forget(now)
            await self._cap()
            for ep in [e for e in self._view if e not in seen]:
                old = self._view[ep]
                if ep in aliases and not old.in_use:
                    del self._view[ep]
                    await self.store.remove_backend(ep)
                elif old.status is Status.OFFLINE and not old.in_use:
                    del self._view[ep]
                    await self.store.remove_backend(ep)
                    await self._event(
                        Event(EventKind.BACKEND_GONE, f"{ep} disappeared: no source sees it", ep)
                    )
        # Counted once its results are in the store: a rescan waiting on this sees them.
        async with self._scanned:
            self.stats.scans += 1
            self.stats.last_scan_s = time.time()
            self._scanned.notify_all()
        return result

    async def _forget(self, now: float) -> None:
        """Retention: drop the backends forget_reason() says to, each with an event."""
        for ep, record in list(self._view.items()):
            why = forget_reason(record, self._sighted.get(ep), now, self.forget_after_s)
            if why is None:
                continue
            del self._view[ep]
            self._sighted.pop(ep, None)
            await self.store.remove_backend(ep)
            await self._event(
                Event(
                    EventKind.BACKEND_GONE,
                    f"{ep} forgotten: {why}",
                    ep,
                    data={"reason": "forget_after", "forget_after_s": self.forget_after_s},
                )
            )
        for ep in [e for e in self._sighted if e not in self._view]:
            del self._sighted[ep]

    async def _cap(self) -> None:
        """Past `max_backends`, drop offline backends not in use, unseen longest first, with one
        event for the lot. Live ones are never dropped to make room."""
        excess = len(self._view) - self.max_backends
        if excess <= 0:
            return
        offline = [r for r in self._view.values() if r.status is Status.OFFLINE and not r.in_use]
        offline.sort(key=lambda r: max(r.last_seen, self._sighted.get(r.endpoint, 0.0)))
        dropped = offline[:excess]
        for record in dropped:
            del self._view[record.endpoint]
            self._sighted.pop(record.endpoint, None)
            await self.store.remove_backend(record.endpoint)
        if dropped:
            await self._event(
                Event(
                    EventKind.BACKEND_GONE,
                    f"forgot {len(dropped)} offline backends, unseen longest first: more than"
                    f" --max-backends {self.max_backends} were known",
                    data={"reason": "max_backends", "count": len(dropped)},
                )
            )

    async def record(self, backends: list[Backend]) -> None:
        """Write results found elsewhere (a one-off scan) into the view, with events."""
        held = await self._held()
        async with self._lock:
            await self._apply(backends, held)

    async def recheck_once(self) -> None:
        held = await self._held()
        nodes = await self._live_nodes() if self.watch_nodes or held else None
        if self.watch_nodes and nodes is not None:
            self._notice_new_nodes(nodes)
        now = self.clock()
        endpoints = [ep for ep in self._view if self._due(ep, held, now)]
        # Started a little apart, not all at once: see pacing.staggered (the API's p99 under a
        # registration flood was that lump).
        results = await staggered(
            [partial(self._observe, ep, held, nodes) for ep in endpoints],
            PROBE_STAGGER_S,
            self.recheck_s / 2,
        )
        self.stats.rechecks += 1
        for r in results:
            if r.status is Status.OFFLINE and r.endpoint not in held:
                misses = self._misses.get(r.endpoint, (0, now))[0] + 1
                wait = offline_recheck_after(misses, self.recheck_s, self.offline_recheck_max_s)
                self._misses[r.endpoint] = (misses, now + wait)
            else:
                self._misses.pop(r.endpoint, None)
        async with self._lock:
            await self._apply(
                [Backend(r.endpoint, [], r) for r in results if r.endpoint in self._view],
                held,
                keep_sources=True,
            )
        for ep in self._misses.keys() - self._view.keys():  # forgotten meanwhile
            del self._misses[ep]

    def _due(self, ep: Endpoint, held: set[Endpoint], now: float) -> bool:
        """A backend found offline again and again is looked at less often (a discovery still
        probes it, and a node that comes back asks for one)."""
        missed = self._misses.get(ep)
        if missed is None or ep in held or self._view[ep].status is not Status.OFFLINE:
            return True
        return now >= missed[1]

    async def _live_nodes(self) -> dict[Endpoint, NodeRegistration] | None:
        """The live registrations, read once per recheck; None when the store cannot say."""
        try:
            return {n.endpoint: n for n in await self.store.live_nodes()}
        except Exception as exc:  # the registry source will say so at the next discovery
            log.info("monitor: node registrations unreadable: %s", exc)
            return None

    def _notice_new_nodes(self, nodes: Mapping[Endpoint, NodeRegistration]) -> None:
        new = nodes.keys() - self._view.keys() - self._nodes_seen
        self._nodes_seen = set(nodes)  # one that leaves and comes back is new again
        if new:
            log.info("monitor: new node registrations %s; discovering now", sorted(new))
            self.request_rescan()

    async def _observe(
        self,
        ep: Endpoint,
        held: set[Endpoint],
        nodes: Mapping[Endpoint, NodeRegistration] | None,
    ) -> ProbeResult:
        if ep not in held:
            result = await self.prober.probe(ep)
            if result.latency_ms is not None:
                lat = self.stats.probe_latencies_ms
                lat.append(result.latency_ms)
                del lat[:-1000]
            return result
        # Held by the coordinator: never connect. Local: is it still listening?
        listening = await asyncio.to_thread(local_listener_state, ep)
        if listening is False:
            return ProbeResult(ep, Status.OFFLINE, error="in use, but no longer listening")
        node = (nodes or {}).get(ep)
        if node is not None and node.status is Status.OFFLINE:
            return ProbeResult(ep, Status.OFFLINE, error="its node reports it down")
        old = self._view.get(ep)
        return ProbeResult(
            ep,
            Status.BUSY,
            version=old.version if old else None,
            devices=old.devices if old else (),
            error="in use by the coordinator",
        )

    async def _apply(
        self, backends: list[Backend], held: set[Endpoint], keep_sources: bool = False
    ) -> None:
        now = self.clock()
        changed: list[BackendRecord] = []
        for b in backends:
            if b.probe is None:
                continue
            old = self._view.get(b.endpoint)
            sources = None if keep_sources else tuple(b.sources)
            names = None if keep_sources else tuple(b.names)
            new = next_record(old, b.probe, sources, b.endpoint in held, now, names)
            event = change_event(old, new)
            if event is not None:
                await self._event(event)
            self._view[b.endpoint] = new
            written_at = self._written_at.get(b.endpoint)
            if written_at is None or news(old, new) or now - written_at >= self.rewrite_every_s:
                changed.append(new)
        if changed:
            await self.store.put_backends(changed)
            for record in changed:
                self._written_at[record.endpoint] = now
        for ep in self._written_at.keys() - self._view.keys():  # forgotten meanwhile
            del self._written_at[ep]

    async def _event(self, event: Event) -> None:
        try:
            await self.store.add_event(event)
        except Exception:
            log.exception("monitor: could not record event")

    def view(self) -> list[BackendRecord]:
        return list(self._view.values())
