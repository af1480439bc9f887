"""The page's last hour (corral.web.history): bounded, fed by the real LiveView from a real store.

Time is the behaviour here, so it is a FakeClock moved by hand: a sample is taken exactly when
one is due, an interval ends exactly when the store says so, and what is older than the hour is
gone, at the edge, not after a margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.endpoint import Endpoint
from corral.store.base import BackendRecord, CoordinatorRecord
from corral.store.sqlite import EmbeddedStore
from corral.types import CoordinatorState, SourceName, Status
from corral.web.app import create_app
from corral.web.history import History, Observation, Seen, timeline
from corral.web.routes import app_context
from tests.support.clock import FakeClock

A = Endpoint("127.0.0.1", 50052)
B = Endpoint("127.0.0.2", 50053)


def obs(
    now: float,
    backends: dict[str, Seen] | None = None,
    tps: float | None = None,
    requests: int = 0,
) -> Observation:
    return Observation(now, tps, requests, backends or {})


def test_pushing_past_capacity_keeps_the_last_hour_only() -> None:
    clock = FakeClock()
    h = History(step_s=10, window_s=3600)
    assert h.capacity == 360
    start = clock.now
    for i in range(1000):  # nearly three hours of samples, one per step
        h.observe(obs(clock.now, {str(A): Seen("ready", float(i))}, tps=float(i), requests=i))
        clock.advance(10)
    last = start + 999 * 10
    assert len(h.times) == 360
    assert list(h.times) == [last - 10 * k for k in range(359, -1, -1)]
    assert list(h.tokens_per_second) == [float(i) for i in range(640, 1000)]
    assert list(h.requests) == [1] * 360  # one more forwarded request per step
    (backend,) = h.to_json()["backends"]
    assert backend["latency_ms"] == [float(i) for i in range(640, 1000)]
    assert backend["timeline"] == [{"status": "ready", "from": last - 3600, "to": None}]


def test_a_sample_only_when_one_is_due_and_nothing_older_than_the_window() -> None:
    clock = FakeClock()
    h = History(step_s=10, window_s=60)
    h.observe(obs(clock.now, requests=5))
    clock.advance(9.999)
    h.observe(obs(clock.now, requests=7))  # not due yet: a refresh, not a sample
    assert len(h.times) == 1 and h.requests[0] is None  # nothing before the first to count
    clock.advance(0.001)
    h.observe(obs(clock.now, requests=7))
    assert list(h.requests) == [None, 2]
    # Refreshes stop for longer than the window (a stalled store, say): on the next one, only
    # that sample is left; a counter that fell (a new app) counts from zero.
    clock.advance(61)
    h.observe(obs(clock.now, requests=3))
    assert list(h.times) == [clock.now]
    assert list(h.requests) == [3]


def test_statuses_are_changes_bounded_per_backend_and_gone_backends_leave() -> None:
    clock = FakeClock()
    h = History(step_s=10, window_s=100, max_changes=4)
    t0 = clock.now
    for status in ("ready", "offline", "ready", "offline", "ready", "offline"):
        h.observe(obs(clock.now, {str(A): Seen(status, None)}))
        clock.advance(1)
    # Six changes, four kept: the timeline starts at the third.
    assert [s["status"] for s in h.to_json()["backends"][0]["timeline"]] == [
        "ready",
        "offline",
        "ready",
        "offline",
    ]
    assert h.to_json()["backends"][0]["timeline"][0]["from"] == t0 + 2
    # Gone from the store: its interval ends; once all of it is older than the window, so is it.
    h.observe(obs(clock.now))
    gone_at = clock.now
    assert h.to_json()["backends"][0]["timeline"][-1] == {
        "status": "offline",
        "from": t0 + 5,
        "to": gone_at,
    }
    clock.advance(100 - 0.5)
    h.observe(obs(clock.now))
    assert h.tracked == [str(A)]
    clock.advance(0.5)
    h.observe(obs(clock.now))
    assert h.tracked == []


def test_a_timeline_clips_to_the_window_and_skips_time_out_of_the_store() -> None:
    changes = [(10.0, "ready"), (20.0, None), (30.0, "offline")]
    assert timeline(changes, 15.0) == [
        {"status": "ready", "from": 15.0, "to": 20.0},
        {"status": "offline", "from": 30.0, "to": None},
    ]


def test_backends_past_the_cap_are_counted_not_kept() -> None:
    h = History(step_s=10, window_s=60, max_backends=1)
    h.observe(obs(1.0, {str(A): Seen("ready", 1.0), str(B): Seen("ready", 2.0)}))
    body = h.to_json()
    assert [b["endpoint"] for b in body["backends"]] == [str(A)]
    assert body["untracked"] == 1


def test_the_clock_going_back_starts_over_rather_than_drawing_time_backwards() -> None:
    h = History(step_s=10, window_s=60)
    h.observe(obs(100.0, {str(A): Seen("ready", 1.0)}))
    h.observe(obs(110.0, {str(A): Seen("ready", 1.0)}))
    h.observe(obs(50.0, {str(A): Seen("ready", 1.0)}))
    assert list(h.times) == [50.0]
    assert h.to_json()["backends"][0]["timeline"] == [{"status": "ready", "from": 50.0, "to": None}]


def test_step_and_window_are_checked() -> None:
    with pytest.raises(ValueError, match="step 0 s"):
        History(step_s=0)
    with pytest.raises(ValueError, match="at most the window"):
        History(step_s=120, window_s=60)


def record(ep: Endpoint, status: Status, latency: float | None, seen: float) -> BackendRecord:
    return BackendRecord(ep, status, "7.0.0", (), (SourceName.FILE,), latency, last_seen=seen)


async def test_api_history_fills_from_a_real_store_through_the_live_view(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    try:
        app = create_app(store, token="t", clock=clock, history_step_s=10)
        live = app_context(app).live
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:

            async def history() -> dict[str, Any]:
                reply = await client.get("/api/history")
                assert reply.status_code == 200
                data: dict[str, Any] = reply.json()
                return data

            t0 = clock.now
            await store.put_backends(
                [record(A, Status.BUSY, None, t0), record(B, Status.OFFLINE, None, 0.0)]
            )
            # Our coordinator holds A: the API says busy, the history (as the page) serving.
            await store.set_coordinator(
                CoordinatorRecord(CoordinatorState.SERVING, (A,), 1234, 18080, "tiny.gguf", t0)
            )
            await live.refresh()
            first = await history()
            assert first["times"] == [t0] and first["step_s"] == 10
            assert first["tokens_per_second"] == [None] and first["requests"] == [None]
            by_ep = {b["endpoint"]: b for b in first["backends"]}
            assert by_ep[str(A)]["timeline"] == [{"status": "serving", "from": t0, "to": None}]
            assert by_ep[str(B)]["timeline"] == [{"status": "offline", "from": t0, "to": None}]

            # B comes back 4 s later: a change at once, a sample only when one is due.
            clock.advance(4)
            await store.put_backends([record(B, Status.READY, 2.5, clock.now)])
            await live.refresh()
            second = await history()
            assert second["times"] == [t0]
            by_ep = {b["endpoint"]: b for b in second["backends"]}
            assert by_ep[str(B)]["timeline"] == [
                {"status": "offline", "from": t0, "to": t0 + 4},
                {"status": "ready", "from": t0 + 4, "to": None},
            ]
            clock.advance(6)
            await live.refresh()
            third = await history()
            assert third["times"] == [t0, t0 + 10]
            by_ep = {b["endpoint"]: b for b in third["backends"]}
            assert by_ep[str(B)]["latency_ms"] == [None, 2.5]
            assert by_ep[str(A)]["latency_ms"] == [None, None]  # held: never probed
            assert third["requests"] == [None, 0]

            # Forgotten by the store: its last interval ends there.
            clock.advance(1)
            await store.remove_backend(B)
            await live.refresh()
            by_ep = {b["endpoint"]: b for b in (await history())["backends"]}
            assert by_ep[str(B)]["timeline"][-1] == {
                "status": "ready",
                "from": t0 + 4,
                "to": t0 + 11,
            }
            openapi = (await client.get("/api/openapi.json")).json()
            assert "/api/history" in openapi["paths"]
    finally:
        await store.close()
