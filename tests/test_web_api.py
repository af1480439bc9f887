"""The dashboard API against a real uvicorn socket, a real EmbeddedStore and real backends.

It lists backends in the `corral backends --json` contract, streams changes as they happen,
exports Prometheus metrics, takes node heartbeats, and acts (rescan, coordinator restart, /v1)
only with the token and a good body: a refused request changes nothing and starts nothing. It
binds publicly only with a token, and on loopback answers only to the machine's own names.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.node.heartbeat import HeartbeatRefused, post_heartbeat
from corral.store.base import BackendRecord, Event, EventKind, NodeRegistration
from corral.store.sqlite import EmbeddedStore
from corral.types import Backend, CoordinatorState, Device, ProbeResult, Status
from corral.web.app import create_app
from corral.web.control import CoordinatorStatus
from corral.web.routes.context import app_context
from corral.web.security import (
    InsecureBindError,
    Refusal,
    check_bind,
    check_host,
    host_name,
    is_loopback_host,
    machine_names,
)
from corral.web.server import serve
from tests.support.dashboard import (
    AUTH,
    TOKEN,
    LlamaController,
    ProbeLoop,
    running_dashboard,
    sse_events,
)
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

CONTRACT_KEYS = set(Backend(Endpoint("127.0.0.1", 1)).to_json()) | {"last_seen", "in_use"}


def client(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, trust_env=False, timeout=10)


async def backends_by_endpoint(c: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await c.get("/api/rpc_backends")
    assert r.status_code == 200
    return {f"{b['host']}:{b['port']}": b for b in r.json()}


async def test_backends_list_real_probes_in_the_json_contract(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with running_dashboard(tmp_path) as dash, client(dash.base) as c:

        async def both_there() -> bool:
            return set(await backends_by_endpoint(c)) == {str(a), str(b)}

        async with ProbeLoop(dash.store, [a, b]):
            await until(both_there, 5, "both backends in the API")
        # The probes have stopped, so the store holds one last round; the API must show it.
        stored = {str(r.endpoint): r for r in await dash.store.backends()}
        expected = {}
        for ep, rec in stored.items():
            # Exactly the `corral backends --json` object for the same data, plus two keys.
            probe = ProbeResult(
                rec.endpoint, rec.status, rec.version, rec.devices, rec.latency_ms, rec.error
            )
            expected[ep] = Backend(rec.endpoint, list(rec.sources), probe).to_json()
        seen: dict[str, dict[str, Any]] = {}

        async def shows_the_store() -> bool:
            seen.update(await backends_by_endpoint(c))
            plain = {
                ep: {k: v for k, v in item.items() if k not in ("last_seen", "in_use")}
                for ep, item in seen.items()
            }
            return plain == expected

        await until(shows_the_store, 5, "the API showing the store's last round")
        for item in seen.values():
            assert set(item) == CONTRACT_KEYS
            assert item["status"] == "ready"
            assert item["version"] == "7.0.0"
            assert item["devices"] and item["devices"][0]["total_bytes"] > 0
            assert item["latency_ms"] is not None and item["latency_ms"] > 0
            assert item["sources"] == ["file"]
            assert item["in_use"] is False
            assert abs(item["last_seen"] - time.time()) < 30


async def test_stream_delivers_a_status_change(rpc_server: StartRpc, tmp_path: Path) -> None:
    """From store.subscribe(): the periodic re-read is set to 30 s, far beyond the wait here."""
    ep, child = await rpc_server()
    async with (
        running_dashboard(tmp_path, refresh_s=30) as dash,
        ProbeLoop(dash.store, [ep]),
        client(dash.base) as c,
    ):
        killed = False
        offline_row: dict[str, Any] | None = None
        offline_event: dict[str, Any] | None = None

        async def read() -> None:
            nonlocal killed, offline_row, offline_event
            async for name, data in sse_events(c, "/api/stream"):
                if name == "backends":
                    mine = [b for b in data if f"{b['host']}:{b['port']}" == str(ep)]
                    if mine and mine[0]["status"] == "ready" and not killed:
                        assert child.pid is not None
                        os.kill(child.pid, signal.SIGKILL)  # the backend this test started
                        killed = True
                    elif killed and mine and mine[0]["status"] == "offline":
                        offline_row = mine[0]
                elif (
                    name == "event"
                    and killed
                    and data["endpoint"] == str(ep)
                    and data["message"].endswith("-> offline")
                ):
                    offline_event = data
                if offline_row and offline_event:
                    return

        await asyncio.wait_for(read(), 10)
        assert offline_row is not None and offline_row["error"]
        assert offline_event is not None and offline_event["kind"] == "backend_status_changed"


async def test_prometheus_metrics_parse_with_a_series_per_backend(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    ep, _ = await rpc_server()
    gone = Endpoint("127.0.0.1", 1)  # nothing listens on port 1 here: offline
    async with (
        running_dashboard(tmp_path) as dash,
        ProbeLoop(dash.store, [ep, gone]),
        client(dash.base) as c,
    ):

        async def both() -> bool:
            return len(await backends_by_endpoint(c)) == 2

        await until(both, 5, "two backends")
        r = await c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}

        def value(family: str, **labels: str) -> float:
            for s in families[family].samples:
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
            raise AssertionError(f"no {family} sample with {labels}")

        assert value("corral_backend_status", endpoint=str(ep), status="ready") == 1
        assert value("corral_backend_status", endpoint=str(ep), status="offline") == 0
        assert value("corral_backend_status", endpoint=str(gone), status="offline") == 1
        total = value("corral_backend_device_total_bytes", endpoint=str(ep), device="0")
        free = value("corral_backend_device_free_bytes", endpoint=str(ep), device="0")
        assert 0 < free <= total
        assert 0 < value("corral_backend_probe_latency_seconds", endpoint=str(ep)) < 1
        assert (
            abs(value("corral_backend_last_seen_timestamp_seconds", endpoint=str(ep)) - time.time())
            < 30
        )
        assert value("corral_backends", status="ready") == 1
        assert value("corral_backends", status="offline") == 1
        assert value("corral_coordinator_state", state="stopped") == 1
        assert value("corral_coordinator_state", state="serving") == 0

        m = (await c.get("/api/metrics")).json()
        assert m["backends"]["total"] == 2
        assert m["backends"]["by_status"]["ready"] == 1
        assert m["backends"]["by_status"]["offline"] == 1
        assert m["probe_latency_ms"]["count"] == 1
        assert m["coordinator"]["state"] == "stopped"


async def test_cached_backends_follow_store_notifications(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path, refresh_s=30) as dash, client(dash.base) as c:
        ep = Endpoint("127.0.0.8", 50052)
        for status in (Status.READY, Status.BUSY, Status.OFFLINE):
            await dash.store.put_backends([BackendRecord(ep, status)])

            async def shows(status: Status = status) -> bool:
                got = await backends_by_endpoint(c)
                return got.get(str(ep), {}).get("status") == str(status)

            await until(shows, 2, f"{status} in /api/rpc_backends")
        await dash.store.remove_backend(ep)

        async def gone() -> bool:
            return await backends_by_endpoint(c) == {}

        await until(gone, 2, "the removed backend gone from /api/rpc_backends")


async def test_events_most_recent_last_with_limit(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path) as dash, client(dash.base) as c:
        for i in range(5):
            await dash.store.add_event(Event(EventKind.WARNING, f"warning {i}"))
        r = await c.get("/api/events", params={"limit": 3})
        assert r.status_code == 200
        assert [e["message"] for e in r.json()] == ["warning 2", "warning 3", "warning 4"]
        assert (await c.get("/api/events", params={"limit": 0})).status_code == 422
        assert (await c.get("/api/events", params={"limit": "x"})).status_code == 422


async def test_heartbeat_over_http_registers_the_node(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path) as dash:
        reg = NodeRegistration(
            node_id="node-1",
            endpoint=Endpoint("127.0.0.9", 50052),
            hostname="gpu-box",
            status=Status.BUSY,
            version="7.0.0",
            devices=(Device(0, 1000, 4000),),
            client="127.0.0.1:41234",
            uptime_s=12.5,
            restarts=2,
            heartbeat_s=2.0,
            last_heartbeat=1.0,  # a client clock far off: the dashboard uses its own
        )
        before = time.time()
        await post_heartbeat(dash.base, TOKEN, reg)
        nodes = await dash.store.live_nodes()
        assert len(nodes) == 1
        got = nodes[0]
        assert got.last_heartbeat >= before
        assert got == NodeRegistration(**{**_fields(reg), "last_heartbeat": got.last_heartbeat})

        with pytest.raises(HeartbeatRefused) as refused:
            await post_heartbeat(dash.base, "not-the-token", reg)
        assert refused.value.status == 401

        async with client(dash.base) as c:

            async def counted() -> bool:
                return bool((await c.get("/api/metrics")).json()["nodes_live"] == 1)

            await until(counted, 5, "the node counted in /api/metrics")


def _fields(reg: NodeRegistration) -> dict[str, Any]:
    return {name: getattr(reg, name) for name in NodeRegistration.__dataclass_fields__}


async def _state(dash: Any) -> tuple[Any, ...]:
    return (
        await dash.store.live_nodes(),
        await dash.store.backends(),
        await dash.store.coordinator(),
        [(e.kind, e.message) for e in await dash.store.events(1000)],
        list(dash.rescans),
    )


GOOD_BEAT = {
    "node_id": "n1",
    "endpoint": "127.0.0.9:50052",
    "hostname": "box",
    "status": "ready",
    "devices": [{"index": 0, "free_bytes": 1, "total_bytes": 2}],
}


async def test_refused_requests_change_nothing(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path) as dash, client(dash.base) as c:
        await dash.store.put_backends([BackendRecord(Endpoint("127.0.0.8", 50052), Status.READY)])
        before = await _state(dash)
        wrong = {"Authorization": "Bearer wrong"}
        cases: list[tuple[str, dict[str, Any], int, str]] = [
            ("/api/rescan", {}, 401, "missing"),
            ("/api/rescan", {"headers": wrong}, 401, "wrong token"),
            ("/api/rescan", {"headers": {"Authorization": TOKEN}}, 401, "must be 'Bearer"),
            ("/api/nodes/heartbeat", {"json": GOOD_BEAT, "headers": wrong}, 401, "wrong"),
            ("/api/coordinator/restart", {"headers": wrong}, 401, "wrong"),
            ("/v1/chat/completions", {"json": {}, "headers": wrong}, 401, "wrong"),
            # bad bodies, right token
            (
                "/api/nodes/heartbeat",
                {"content": b"{bad", "headers": {**AUTH, "Content-Type": "application/json"}},
                400,
                "not valid JSON",
            ),
            (
                "/api/nodes/heartbeat",
                {"content": b"\xff{}", "headers": {**AUTH, "Content-Type": "application/json"}},
                400,
                "not UTF-8",
            ),
            (
                "/api/nodes/heartbeat",
                {"content": b"[" * 60_000, "headers": {**AUTH, "Content-Type": "application/json"}},
                400,
                "nested too deeply",
            ),
            (
                "/api/nodes/heartbeat",
                {
                    "content": b"a=b",
                    "headers": {**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                },
                415,
                "Content-Type",
            ),
            (
                "/api/nodes/heartbeat",
                {"json": {**GOOD_BEAT, "endpoint": "coordinator:0"}, "headers": AUTH},
                422,
                "placeholder",
            ),
            (
                "/api/nodes/heartbeat",
                {"json": {**GOOD_BEAT, "endpoint": "10.0.0.1:0"}, "headers": AUTH},
                422,
                "port 0",
            ),
            (
                "/api/nodes/heartbeat",
                {"json": {**GOOD_BEAT, "status": "great"}, "headers": AUTH},
                422,
                "status",
            ),
            (
                "/api/nodes/heartbeat",
                {"json": {**GOOD_BEAT, "surprise": 1}, "headers": AUTH},
                422,
                "surprise",
            ),
            (
                "/api/nodes/heartbeat",
                {"json": {**GOOD_BEAT, "restarts": "3"}, "headers": AUTH},
                422,
                "restarts",
            ),
            (
                "/api/nodes/heartbeat",
                {"json": {k: v for k, v in GOOD_BEAT.items() if k != "node_id"}, "headers": AUTH},
                422,
                "node_id",
            ),
            (
                "/api/nodes/heartbeat",
                {"json": {**GOOD_BEAT, "hostname": "a\nb"}, "headers": AUTH},
                422,
                "hostname",
            ),
            ("/api/nodes/heartbeat", {"json": [GOOD_BEAT], "headers": AUTH}, 422, "body"),
            ("/api/coordinator/restart", {"json": {"reason": 5}, "headers": AUTH}, 422, "reason"),
            # oversized, declared and undeclared (chunked)
            (
                "/api/nodes/heartbeat",
                {"json": {**GOOD_BEAT, "hostname": "x" * 70_000}, "headers": AUTH},
                413,
                "larger than 65536",
            ),
            (
                "/api/nodes/heartbeat",
                {
                    "content": _chunks(b"x" * 70_000),
                    "headers": {**AUTH, "Content-Type": "application/json"},
                },
                413,
                "larger than 65536",
            ),
        ]
        for path, kwargs, status, says in cases:
            r = await c.post(path, **kwargs)
            assert r.status_code == status, (path, kwargs.get("json"), r.text)
            assert says.lower() in r.text.lower(), (path, r.text)
            if status == 401:
                assert r.headers["www-authenticate"].startswith("Bearer")
        # Other methods that could act are guarded the same way.
        assert (await c.put("/api/rescan", headers=wrong)).status_code == 401
        assert (await c.delete("/api/rescan")).status_code == 401
        # Nothing was started in the background either: an accepted action spawns its job before
        # it answers, so by now any job a refused request had begun would be listed.
        ctx = app_context(dash.app)
        assert not ctx.jobs.tasks and not ctx.jobs.restarting
        assert ctx.figures.scans_requested == 0
        assert await _state(dash) == before

        # ... while the same requests with the token and a good body do act.
        r = await c.post("/api/nodes/heartbeat", json=GOOD_BEAT, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {"node_id": "n1", "endpoint": "127.0.0.9:50052", "ttl_s": 6.0}
        assert [n.node_id for n in await dash.store.live_nodes()] == ["n1"]


async def _chunks(data: bytes) -> Any:
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]


async def test_without_a_token_the_dashboard_is_read_only(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path, token=None) as dash, client(dash.base) as c:
        before = await _state(dash)
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer x"}):
            r = await c.post("/api/rescan", headers=headers)
            assert r.status_code == 401
            assert "CORRAL_TOKEN" in r.json()["detail"]
            r = await c.post("/api/nodes/heartbeat", json=GOOD_BEAT, headers=headers)
            assert r.status_code == 401
        assert await _state(dash) == before
        assert (await c.get("/api/rpc_backends")).status_code == 200


async def test_rescan_runs_the_callback_and_is_counted(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path) as dash, client(dash.base) as c:
        r = await c.post("/api/rescan", headers=AUTH)
        assert r.status_code == 202 and r.json()["accepted"] is True

        async def done() -> bool:
            m = (await c.get("/api/metrics")).json()
            return bool(m["scans"]["completed"] == 1)

        await until(done, 5, "the rescan to complete")
        assert len(dash.rescans) == 1
    async with running_dashboard(tmp_path / "2", with_rescan=False) as dash, client(dash.base) as c:
        r = await c.post("/api/rescan", headers=AUTH)
        assert r.status_code == 409 and "no monitor" in r.json()["detail"]


async def test_coordinator_view_restart_and_v1_forwarding(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    (used, _), (idle, _) = await rpc_server(), await rpc_server()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    ctl = LlamaController(llama_bins, tiny_model, [used], tmp_path, store)
    try:
        await ctl.start()
        async with (
            running_dashboard(
                tmp_path, store=store, coordinator=ctl, coordinator_url=ctl.base_url
            ) as dash,
            ProbeLoop(store, [used, idle]),
            client(dash.base) as c,
        ):
            await _coordinator_checks(c, ctl, used, idle)
    finally:
        await ctl.stop()
        await store.close()


async def _coordinator_checks(
    c: httpx.AsyncClient, ctl: LlamaController, used: Endpoint, idle: Endpoint
) -> None:
    co = (await c.get("/api/coordinator")).json()
    assert co["state"] == "serving" and co["source"] == "controller"
    assert co["backends"] == [str(used)] and co["pid"] == ctl.child.pid  # type: ignore[union-attr]
    assert co["model"] == "tiny.gguf" and co["uptime_s"] >= 0

    async def marked() -> bool:
        got = await backends_by_endpoint(c)
        return (
            got.get(str(used), {}).get("in_use") is True
            and got.get(str(idle), {}).get("in_use") is False
        )

    await until(marked, 5, "in_use on the backend the coordinator uses")
    got = await backends_by_endpoint(c)
    assert got[str(used)]["status"] == "busy"  # llama-server holds it
    assert got[str(idle)]["status"] == "ready"

    # /v1 forwarded: plain and streaming; our token is required and not passed on.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 401
    r = await c.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert (await c.get("/v1/models")).status_code == 401  # every /v1 request reaches the model
    assert (await c.get("/v1/models", headers=AUTH)).json()["data"]
    chunks = []
    async with c.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
    ) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        async for line in s.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]" and len(chunks) >= 3
    text = "".join(
        (json.loads(x)["choices"][0]["delta"].get("content") or "")
        for x in chunks[:-1]
        if json.loads(x).get("choices")
    )
    assert text
    # Only the OpenAI-compatible routes reach llama-server: its /props, /slots, /metrics stay out
    # of reach however the path is spelled, and nothing refused is counted as a request.
    for path, status, says in [
        ("/v1/%2e%2e/props", 404, "percent-encoded"),
        ("/v1/%2E%2E/slots", 404, "percent-encoded"),
        ("/v1/..%2fmetrics", 404, "percent-encoded"),
        ("/v1/../props", 404, "not forwarded"),
        ("/v1/props", 404, "not forwarded"),
        ("/v1/chat%2fcompletions", 404, "percent-encoded"),
        ("/v1/models/", 404, "not forwarded"),
        ("/v1/chat/completions", 405, "takes POST"),
    ]:
        code, answer = await raw_get(c.base_url, path)
        assert (code, says in answer) == (status, True), (path, code, answer)
        assert "default_generation_settings" not in answer and "n_ctx" not in answer
    m = (await c.get("/api/metrics")).json()["coordinator"]
    assert m["requests_total"] == 3 and m["requests_failed"] == 0
    assert m["requests_in_flight"] == 0
    assert m["tokens_per_second"] is not None and m["tokens_per_second"] > 0

    # Restart through the API: a new llama-server process, counted, with the reason.
    old_pid = ctl.child.pid  # type: ignore[union-attr]
    r = await c.post("/api/coordinator/restart", json={"reason": "test says so"}, headers=AUTH)
    assert r.status_code == 202

    async def restarted() -> bool:
        co = (await c.get("/api/coordinator")).json()
        return bool(co["restarts"] == 1 and co["state"] == "serving")

    await until(restarted, 20, "the coordinator to restart")
    co = (await c.get("/api/coordinator")).json()
    assert co["pid"] != old_pid and co["last_reason"] == "test says so"

    # The coordinator gone: /v1 answers 502 saying so, and counts a failure.
    await ctl.stop()
    r = await c.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 502 and "unreachable" in r.json()["detail"]
    m = (await c.get("/api/metrics")).json()["coordinator"]
    assert m["requests_failed"] == 1


async def raw_get(base: httpx.URL, path: str) -> tuple[int, str]:
    """GET `path` exactly as written (httpx would normalise dot segments), with our token."""
    reader, writer = await asyncio.open_connection(base.host, base.port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {base.host}:{base.port}\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        reply = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
    finally:
        writer.close()
    return int(reply.split(" ", 2)[1]), reply


async def test_without_coordinator_restart_is_409_and_v1_is_503(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path) as dash, client(dash.base) as c:
        r = await c.post("/api/coordinator/restart", headers=AUTH)
        assert r.status_code == 409 and "does not run a coordinator" in r.json()["detail"]
        r = await c.post("/v1/chat/completions", json={}, headers=AUTH)
        assert r.status_code == 503 and "no coordinator" in r.json()["detail"]
        co = (await c.get("/api/coordinator")).json()
        assert co == {
            "state": "stopped",
            "tone": "idle",
            "pid": None,
            "port": None,
            "model": None,
            "backends": [],
            "uptime_s": None,
            "restarts": 0,
            "last_reason": None,
            "tokens_per_second": None,
            "source": "none",
            "memory": [],
        }


async def test_health_and_page(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path) as dash, client(dash.base) as c:
        h = await c.get("/healthz")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        page = await c.get("/")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "'sha256-" in csp
        html = page.text
        assert 'id="backends-table"' in html and 'id="empty-state"' in html
        # Nothing from the internet: no external URL in any src/href.
        assert "http://" not in html and "https://" not in html
        schema = (await c.get("/api/openapi.json")).json()
        for path in (
            "/api/rpc_backends",
            "/api/coordinator",
            "/api/metrics",
            "/api/events",
            "/api/stream",
            "/api/rescan",
            "/api/coordinator/restart",
            "/api/nodes/heartbeat",
            "/metrics",
            "/healthz",
        ):
            assert path in schema["paths"], path


def test_bind_check_is_loopback_or_token_or_insecure() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback_host(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.org", "127.0.0.1.nip.io"):
        assert not is_loopback_host(host)
        with pytest.raises(InsecureBindError, match="CORRAL_TOKEN"):
            check_bind(host, None)
        with pytest.raises(InsecureBindError):
            check_bind(host, "")
        check_bind(host, "a-token")
        check_bind(host, None, insecure=True)


async def test_serve_refuses_a_public_bind_without_token_before_binding(
    tmp_path: Path,
) -> None:
    store = await EmbeddedStore.open(tmp_path / "s.db")
    try:
        app = create_app(store)
        with pytest.raises(InsecureBindError):
            await serve(app, "0.0.0.0", 0, handle_signals=False)
    finally:
        await store.close()


def test_host_check_refuses_foreign_names_only_on_loopback() -> None:
    assert host_name("[::1]:8080") == "::1"
    assert host_name("localhost:8080") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"
    for header in ("127.0.0.1:8080", "localhost", "localhost:1", "[::1]:80", "127.9.9.9", None):
        check_host("127.0.0.1", header)
        check_host("::1", header)
    for header in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io:8080", "192.0.2.1"):
        with pytest.raises(Refusal, match="DNS rebinding") as refused:
            check_host("127.0.0.1", header)
        assert refused.value.status == 421
        # Reached on a LAN address, any name is fine: that is how the LAN reaches it.
        check_host("192.0.2.10", header)
    check_host(None, "evil.example")
    # The machine's own names, as its owner set them, pass on loopback (Debian: 127.0.1.1).
    hosts = "127.0.0.1 localhost\n127.0.1.1 gpu-box.lan gpu-box  # this machine\n"
    hosts += "192.0.2.7 nas\n# 127.0.0.1 commented\n::1 ip6-localhost\n"
    names = machine_names(hosts, "Gpu-Box")
    assert names == {"localhost", "gpu-box.lan", "gpu-box", "ip6-localhost"}
    check_host("127.0.1.1", "gpu-box.lan:8080", names)
    check_host("127.0.1.1", "GPU-BOX.", names)
    for header in ("nas:8080", "commented", "evil.example"):
        with pytest.raises(Refusal):
            check_host("127.0.1.1", header, names)


async def test_a_rebound_name_cannot_read_or_act_on_a_loopback_dashboard(tmp_path: Path) -> None:
    async with running_dashboard(tmp_path) as dash, client(dash.base) as c:
        await dash.store.put_backends([BackendRecord(Endpoint("127.0.0.8", 50052), Status.READY)])

        async def listed() -> bool:
            return len(await backends_by_endpoint(c)) == 1

        await until(listed, 2, "the backend in /api/rpc_backends")
        port = dash.base.rsplit(":", 1)[1]
        foreign = {"Host": f"rebind.example:{port}"}
        for path in ("/", "/api/rpc_backends", "/api/events", "/metrics"):
            r = await c.get(path, headers=foreign)
            assert r.status_code == 421, path
            assert "rebind.example" in r.json()["detail"]
        r = await c.post("/api/rescan", headers={**foreign, **AUTH})
        assert r.status_code == 421  # refused before anything ran, even with the right token
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"{socket.gethostname()}:{port}"):
            r = await c.get("/api/rpc_backends", headers={"Host": host})
            assert r.status_code == 200 and len(r.json()) == 1
        r = await c.post("/api/rescan", headers={"Host": f"localhost:{port}", **AUTH})
        assert r.status_code == 202

        async def one_scan() -> bool:
            return bool((await c.get("/api/metrics")).json()["scans"]["completed"] == 1)

        await until(one_scan, 5, "the one allowed rescan to complete")
        assert len(dash.rescans) == 1  # the refused one never ran


def test_coordinator_status_satisfies_the_protocol() -> None:
    st = CoordinatorStatus(CoordinatorState.SERVING, backends=(Endpoint("127.0.0.1", 5),))
    assert st.state == "serving" and st.restarts == 0
