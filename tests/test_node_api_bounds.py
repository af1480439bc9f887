"""`POST /api/nodes/heartbeat` is bounded: at most --max-nodes live nodes, new registrations
rate-limited per client address (a token bucket), 429 with Retry-After past either; a heartbeat
from a node already registered always passes and costs nothing.

Against the real app on a real uvicorn socket, on a FakeClock: every edge is asserted at the
exact tick (one before: refused; at it: taken), with no sleeping.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from corral.web.security import (
    DEFAULT_MAX_NODES,
    DEFAULT_REGISTRATION_BURST,
    DEFAULT_REGISTRATION_RATE,
    NodeAdmission,
    RateLimit,
    TokenBuckets,
)
from tests.support.clock import FakeClock
from tests.support.dashboard import AUTH
from tests.support.guarded import beat, serving_app

HEARTBEAT = "/api/nodes/heartbeat"
TTL_S = 6.0  # heartbeat_s 2 x three missed beats


def test_token_bucket_per_key_on_an_injected_clock() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(RateLimit(rate=10, burst=20))
    assert [buckets.take("a", clock()) for _ in range(20)] == [0.0] * 20
    assert buckets.take("a", clock()) == pytest.approx(0.1)  # empty: one token in 0.1 s
    assert buckets.take("b", clock()) == 0.0  # another client has its own bucket
    clock.advance(0.099)
    assert buckets.take("a", clock()) > 0
    clock.advance(0.001)
    assert buckets.take("a", clock()) == 0.0
    clock.advance(3600)  # refills to the burst, never past it
    assert [buckets.take("a", clock()) for _ in range(21)].count(0.0) == 20
    # At most max_keys buckets: the full ones go first.
    small = TokenBuckets(RateLimit(rate=1, burst=1), max_keys=3)
    for key in "abcdef":
        small.take(key, clock())
    assert len(small) <= 3
    with pytest.raises(ValueError):
        RateLimit(rate=0)


def test_admission_cap_and_rate_are_pure() -> None:
    clock = FakeClock()
    nodes = NodeAdmission(max_nodes=2, limit=RateLimit(rate=1, burst=2))
    assert nodes.admit("10.0.0.1", "a", "10.0.0.1:50052", TTL_S, clock()) is None
    assert nodes.admit("10.0.0.1", "b", "10.0.0.1:50053", TTL_S, clock()) is None
    full = nodes.admit("10.0.0.2", "c", "10.0.0.2:50052", TTL_S, clock())
    assert full is not None and full.status == 429 and "--max-nodes 2" in full.detail
    assert full.headers == {"Retry-After": "6"}
    for _ in range(100):  # known nodes: always, and without tokens
        assert nodes.admit("10.0.0.1", "a", "10.0.0.1:50052", TTL_S, clock()) is None
    # The same id at another endpoint is a new registration: cap applies (it replaces itself).
    moved = nodes.admit("10.0.0.1", "a", "10.0.0.1:50099", TTL_S, clock())
    assert moved is not None and "new node registrations from 10.0.0.1" in moved.detail
    assert moved.headers == {"Retry-After": "1"}
    clock.advance(TTL_S)  # b expires; a was refreshed at the same tick, so both are gone
    assert nodes.live(clock()) == 0
    assert nodes.admit("10.0.0.2", "c", "10.0.0.2:50052", TTL_S, clock()) is None
    assert nodes.live(clock()) == 1
    # The guard's early look takes nothing, and passes a live id whatever the rate.
    early = NodeAdmission(max_nodes=5, limit=RateLimit(rate=1, burst=1))
    assert early.precheck("10.0.0.3", "x", clock()) is None
    assert early.precheck("10.0.0.3", "x", clock()) is None
    assert early.admit("10.0.0.3", "x", "10.0.0.3:1", TTL_S, clock()) is None
    refused = early.precheck("10.0.0.3", "y", clock())
    assert refused is not None and refused.headers == {"Retry-After": "1"}
    assert early.precheck("10.0.0.3", "x", clock()) is None


async def _post_all(c: httpx.AsyncClient, bodies: list[dict[str, object]]) -> list[int]:
    replies = await asyncio.gather(*(c.post(HEARTBEAT, json=b, headers=AUTH) for b in bodies))
    return [r.status_code for r in replies]


async def test_live_nodes_are_capped_and_registered_nodes_always_pass(tmp_path: Path) -> None:
    clock = FakeClock()
    unlimited = RateLimit(rate=1e6, burst=1e6)
    async with (
        serving_app(tmp_path, max_nodes=3, registrations=unlimited, clock=clock) as srv,
        httpx.AsyncClient(base_url=srv.base, trust_env=False, timeout=10) as c,
    ):
        assert await _post_all(c, [beat(1), beat(2), beat(3)]) == [200, 200, 200]
        r = await c.post(HEARTBEAT, json=beat(4), headers=AUTH)
        assert r.status_code == 429, r.text
        assert "3 nodes are registered" in r.json()["detail"]
        assert "--max-nodes 3" in r.json()["detail"]
        assert r.headers["retry-after"] == "6"
        # At the cap, the registered nodes' heartbeats still pass, every one.
        assert await _post_all(c, [beat(n) for n in (1, 2, 3) for _ in range(5)]) == [200] * 15
        clock.advance(5)  # n1-n3 refreshed at t0: one second left of their TTL
        r = await c.post(HEARTBEAT, json=beat(4), headers=AUTH)
        assert (r.status_code, r.headers["retry-after"]) == (429, "1")
        clock.advance(1)  # exactly their TTL: gone, a place is free
        assert (await c.post(HEARTBEAT, json=beat(4), headers=AUTH)).status_code == 200
        stored = {n.node_id for n in await srv.store.live_nodes()}
        assert "n4" in stored


async def test_new_registrations_are_rate_limited_per_client_address(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        serving_app(tmp_path, clock=clock) as srv,  # the defaults: 10/s, bursts of 20
        httpx.AsyncClient(base_url=srv.base, trust_env=False, timeout=30) as c,
    ):
        # A flood from one address, the clock standing still: the burst passes, no more.
        codes = await _post_all(c, [beat(n) for n in range(200)])
        assert codes.count(200) == DEFAULT_REGISTRATION_BURST == 20
        assert codes.count(429) == 180
        assert len(await srv.store.live_nodes()) == 20
        r = await c.post(HEARTBEAT, json=beat(500), headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "at most 10 a second" in r.json()["detail"]
        # Heartbeats of the 20 registered nodes are neither refused nor counted.
        accepted = [n for n, code in enumerate(codes) if code == 200]
        assert await _post_all(c, [beat(n) for n in accepted * 3]) == [200] * 60
        # One token every 1/10 s, to the tick.
        clock.advance(0.1 * 0.999)
        assert (await c.post(HEARTBEAT, json=beat(501), headers=AUTH)).status_code == 429
        clock.advance(0.1 * 0.001)
        assert (await c.post(HEARTBEAT, json=beat(502), headers=AUTH)).status_code == 200
        assert (await c.post(HEARTBEAT, json=beat(503), headers=AUTH)).status_code == 429
        # Another client address has its own bucket.
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(
            base_url=srv.base, transport=other, trust_env=False, timeout=10
        ) as c2:
            codes2 = await _post_all(c2, [beat(n) for n in range(1000, 1025)])
            assert codes2.count(200) == 20 and codes2.count(429) == 5


async def test_the_schema_documents_429_with_retry_after(tmp_path: Path) -> None:
    async with (
        serving_app(tmp_path) as srv,
        httpx.AsyncClient(base_url=srv.base, trust_env=False, timeout=10) as c,
    ):
        schema = (await c.get("/api/openapi.json")).json()
        too_many = schema["paths"][HEARTBEAT]["post"]["responses"]["429"]
        assert "Retry-After" in too_many["headers"]


def test_option_defaults_agree() -> None:
    from corral.cli.options import FORGET_AFTER_S, MAX_BACKENDS, MAX_NODES
    from corral.monitor import DEFAULT_FORGET_AFTER_S, DEFAULT_MAX_BACKENDS

    assert MAX_NODES == DEFAULT_MAX_NODES == 1024
    assert FORGET_AFTER_S == DEFAULT_FORGET_AFTER_S == 24 * 3600
    assert MAX_BACKENDS == DEFAULT_MAX_BACKENDS == 4096
    assert (DEFAULT_REGISTRATION_RATE, DEFAULT_REGISTRATION_BURST) == (10, 20)


def test_the_options_reach_the_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    """`corral dashboard --max-nodes N --forget-after S` hands both to the plane it runs."""
    from typer.testing import CliRunner

    import corral.cli.plane as cli_plane
    from corral.cli.app import make_app
    from corral.plane.plane import PlaneConfig

    got: list[PlaneConfig] = []
    monkeypatch.setattr(cli_plane, "_run", lambda cfg, *rest: got.append(cfg))
    runner = CliRunner()
    app = make_app()
    result = runner.invoke(
        app, ["dashboard", "--max-nodes", "7", "--forget-after", "90", "--sources", "file"]
    )
    assert result.exit_code == 0, result.output
    assert got[0].max_nodes == 7 and got[0].watch.forget_after_s == 90
    result = runner.invoke(app, ["dashboard", "--max-nodes", "0"])
    assert result.exit_code == 2
