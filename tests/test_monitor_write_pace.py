"""The monitor's pace. It writes a backend record when it says something new, and otherwise only at
`rewrite_every_s`: rewriting every record at every 2 s recheck kept the store and each of its
readers busy, and under a registration flood that was the API's p99 (issue: hardening).

Real Monitor, real EmbeddedStore, real probes (a fake protocol-correct RPC server is ready; a
closed loopback port is offline), on a FakeClock: the pace is asserted at the exact tick.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

from corral.discovery import Discovery
from corral.endpoint import Endpoint
from corral.monitor import OFFLINE_FULL_PACE, Monitor, news, offline_recheck_after
from corral.rpc.held import HeldBackends
from corral.rpc.probe import Prober
from corral.store.base import BackendRecord
from corral.store.decoded import DecodedRows
from corral.store.sqlite import EmbeddedStore
from corral.types import Status
from tests.support.clock import FakeClock
from tests.support.fake_servers import fake_server, rpc
from tests.support.loopback import free_port, next_loopback
from tests.support.sources import ListedSource

REWRITE_S = 10.0


def test_only_last_seen_and_latency_are_not_news() -> None:
    old = BackendRecord(Endpoint("127.0.0.9", 50052), Status.READY, latency_ms=1.0, last_seen=5)
    assert news(None, old)
    assert not news(old, replace(old, last_seen=99.0, latency_ms=3.5))
    assert news(old, replace(old, status=Status.BUSY))
    assert news(old, replace(old, error="refused"))
    assert news(old, replace(old, in_use=True))


async def test_unchanged_records_are_written_at_the_slower_pace(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    held = HeldBackends()
    prober = Prober(timeout=1.0, held=held)
    host = next_loopback()
    closed = Endpoint(host, free_port(host))
    try:
        async with fake_server(rpc()) as ready:
            monitor = Monitor(
                store,
                prober,
                lambda: Discovery([ListedSource([closed, ready.endpoint])], prober),
                held=held,
                clock=clock,
                rewrite_every_s=REWRITE_S,
            )
            await monitor.discover_once()
            written = {r.endpoint: r for r in await store.backends()}
            assert written[ready.endpoint].status is Status.READY
            first_seen_at = written[ready.endpoint].last_seen

            clock.advance(REWRITE_S - 1)
            await monitor.recheck_once()
            # Nothing new: the store still holds the first write, the view has the new time.
            stored = {r.endpoint: r for r in await store.backends()}
            assert stored[ready.endpoint].last_seen == first_seen_at
            view = {r.endpoint: r for r in monitor.view()}
            assert view[ready.endpoint].last_seen == first_seen_at + REWRITE_S - 1

            clock.advance(1)
            await monitor.recheck_once()
            stored = {r.endpoint: r for r in await store.backends()}
            assert stored[ready.endpoint].last_seen == first_seen_at + REWRITE_S

        # The server is gone: news, written at once, not at the pace.
        clock.advance(1)
        await monitor.recheck_once()
        stored = {r.endpoint: r for r in await store.backends()}
        assert stored[ready.endpoint].status is Status.OFFLINE
    finally:
        await store.close()


def test_decoded_rows_decode_only_new_or_changed_text() -> None:
    rows: DecodedRows[str, str] = DecodedRows()
    decoded: list[str] = []
    refused: list[str] = []

    def decode(key: str, text: str) -> str:
        decoded.append(key)
        if text == "bad":
            raise ValueError(text)
        return text.upper()

    def read(pairs: list[tuple[str, str]]) -> list[str]:
        return rows.read(pairs, decode, lambda key, exc: refused.append(key), ValueError)

    assert read([("a", "x"), ("b", "y"), ("c", "bad")]) == ["X", "Y"]
    assert decoded == ["a", "b", "c"] and refused == ["c"]
    first = read([("a", "x"), ("b", "z"), ("c", "bad")])
    assert first == ["X", "Z"]
    assert decoded == ["a", "b", "c", "b", "c"]  # only the changed row and the refused one
    assert refused == ["c", "c"]  # a bad row is reported at every read, as before
    # A row that left is forgotten: coming back with the same text decodes it again.
    read([("b", "z")])
    read([("a", "x"), ("b", "z")])
    assert decoded[-1] == "a"


def test_offline_rechecks_back_off_after_the_full_pace_misses() -> None:
    assert [offline_recheck_after(m, 2.0, 30.0) for m in range(1, 10)] == [
        2.0, 2.0, 2.0, 2.0, 2.0, 4.0, 8.0, 16.0, 30.0,
    ]  # fmt: skip


async def test_an_offline_backend_is_rechecked_less_often_then_seen_when_it_answers(
    tmp_path: Path,
) -> None:
    """Found offline more than OFFLINE_FULL_PACE times in a row, its next recheck waits twice
    the pace:
    a listener that appears meanwhile is seen at that recheck, not before."""
    clock = FakeClock()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    held = HeldBackends()
    prober = Prober(timeout=1.0, held=held)
    host = next_loopback()
    ep = Endpoint(host, free_port(host))
    monitor = Monitor(
        store,
        prober,
        lambda: Discovery([ListedSource([ep])], prober),
        held=held,
        clock=clock,
        recheck_s=2.0,
    )
    listener = socket.socket()
    try:
        await monitor.discover_once()
        for _ in range(OFFLINE_FULL_PACE + 1):  # the last of these waits twice the pace
            clock.advance(2.0)
            await monitor.recheck_once()
        assert {r.endpoint: r.status for r in monitor.view()} == {ep: Status.OFFLINE}
        # Something listens there now (it never answers HELLO: a connect that is queued and
        # not served reads `busy`, see the facts file).
        listener.bind((ep.host, ep.port))
        listener.listen(4)
        clock.advance(2.0)
        await monitor.recheck_once()  # not due: 4 s after the last miss
        assert monitor.view()[0].status is Status.OFFLINE
        clock.advance(2.0)
        await monitor.recheck_once()  # due
        assert monitor.view()[0].status is not Status.OFFLINE
    finally:
        listener.close()
        await store.close()
