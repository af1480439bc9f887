"""Retention: the monitor forgets a backend that has not answered and that no source but the
cache (the store's own last view, which re-sights every stored backend at each run) has seen for
--forget-after, with a `backend_disappeared` event giving the reason. Without it, the tester's
888 offline backends of expired registrations stayed listed for good.

Real Monitor, real Discovery with the real cache source, a real EmbeddedStore and real probes (a
closed loopback port is offline; a fake protocol-correct RPC server is ready), on a FakeClock:
the edge is asserted at the exact tick.
"""

from __future__ import annotations

from pathlib import Path

from corral.discovery import Discovery
from corral.endpoint import Endpoint
from corral.monitor import Monitor
from corral.rpc.held import HeldBackends
from corral.rpc.probe import Prober
from corral.sources.cache import CacheSource
from corral.store.base import BackendRecord, EventKind
from corral.store.sqlite import EmbeddedStore
from corral.types import SourceName, Status
from tests.support.clock import FakeClock
from tests.support.fake_servers import fake_server, rpc
from tests.support.loopback import free_port, next_loopback
from tests.support.sources import ListedSource

FORGET_S = 3600.0


def _closed() -> Endpoint:
    host = next_loopback()
    return Endpoint(host, free_port(host))  # nothing listens: refused, offline


async def test_unseen_offline_backends_are_forgotten_at_forget_after(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    held = HeldBackends()
    prober = Prober(timeout=1.0, held=held)
    gone, listed = _closed(), _closed()
    try:
        async with fake_server(rpc()) as ready:
            source = ListedSource([gone, listed, ready.endpoint])
            monitor = Monitor(
                store,
                prober,
                lambda: Discovery([source, CacheSource(store)], prober),
                held=held,
                forget_after_s=FORGET_S,
                clock=clock,
            )

            async def stored() -> dict[Endpoint, BackendRecord]:
                return {r.endpoint: r for r in await store.backends()}

            await monitor.discover_once()
            first = await stored()
            assert first[gone].status is Status.OFFLINE
            assert first[ready.endpoint].status is Status.READY
            # The registration (here: the listing) ends; only the cache still names them.
            source.endpoints = [listed]
            clock.advance(FORGET_S - 1)
            await monitor.discover_once()
            assert set(await stored()) == {gone, listed, ready.endpoint}  # one tick early
            clock.advance(1)
            await monitor.discover_once()
            # Forgotten: the offline one nothing but the cache saw. Kept: the one a source
            # still lists (offline as it is), and the one that still answers.
            assert set(await stored()) == {listed, ready.endpoint}
            events = [e for e in await store.events(100) if e.endpoint == gone]
            last = events[-1]
            assert last.kind is EventKind.BACKEND_GONE
            assert last.data["reason"] == "forget_after"
            assert "forgotten" in last.message and f"--forget-after {FORGET_S:g} s" in last.message
            assert "for 60 min" in last.message
            # And it stays gone: the cache no longer holds it to sight again.
            clock.advance(FORGET_S * 10)
            await monitor.discover_once()
            assert gone not in await stored()
            assert [e.kind for e in await store.events(100) if e.endpoint == gone].count(
                EventKind.BACKEND_GONE
            ) == 1
            assert {r.endpoint for r in monitor.view()} == {listed, ready.endpoint}
    finally:
        await store.close()


def test_forget_reason_is_pure() -> None:
    from corral.monitor import forget_reason

    now = 1_700_000_000.0
    old = BackendRecord(
        Endpoint("127.0.0.5", 50052),
        Status.OFFLINE,
        sources=(SourceName.CACHE,),
        first_seen=now - 10 * FORGET_S,
        last_seen=now - FORGET_S,
    )
    assert forget_reason(old, None, now, FORGET_S) is not None
    assert forget_reason(old, None, now - 0.001, FORGET_S) is None
    # Seen by a real source since: kept, until that sighting is as old.
    assert forget_reason(old, now - 10, now, FORGET_S) is None
    assert forget_reason(old, now - FORGET_S, now, FORGET_S) is not None
    # In use by the coordinator, or answering: never.
    assert forget_reason(_with(old, in_use=True), None, now, FORGET_S) is None
    for status in (Status.READY, Status.BUSY, Status.INCOMPATIBLE, Status.NOT_RPC):
        assert forget_reason(_with(old, status=status), None, now, FORGET_S) is None


def _with(record: BackendRecord, **changes: object) -> BackendRecord:
    from dataclasses import replace

    return replace(record, **changes)  # type: ignore[arg-type]


async def test_past_max_backends_the_offline_ones_unseen_longest_go_first(tmp_path: Path) -> None:
    """A flood from many addresses passes each address's rate limit; the list must still not
    grow without end. Live backends are never dropped to make room."""
    clock = FakeClock()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    held = HeldBackends()
    prober = Prober(timeout=1.0, held=held)
    old, newer = [_closed() for _ in range(3)], [_closed() for _ in range(2)]
    try:
        async with fake_server(rpc()) as ready:
            source = ListedSource(old)
            monitor = Monitor(
                store,
                prober,
                lambda: Discovery([source, CacheSource(store)], prober),
                held=held,
                clock=clock,
                max_backends=3,
            )
            await monitor.discover_once()
            clock.advance(60)
            source.endpoints = [*newer, ready.endpoint]
            await monitor.discover_once()
            kept = {r.endpoint for r in await store.backends()}
            assert ready.endpoint in kept and len(kept) == 3
            assert kept == {ready.endpoint, *newer}  # the three seen a minute earlier went
            [event] = [
                e
                for e in await store.events()
                if e.kind is EventKind.BACKEND_GONE and e.data.get("reason") == "max_backends"
            ]
            assert event.data["count"] == 3
    finally:
        await store.close()
