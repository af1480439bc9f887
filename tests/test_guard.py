"""The dashboard's guard against a real uvicorn socket: Host read as a URL authority, /v1 behind
the token for every method, every body bounded on every route (413 with a reason, read in
chunks, never held whole past the cap, the answer delivered rather than a reset), and JSON's
missing NaN/Infinity refused with 422 saying which.

Requests httpx would normalise (two Host headers, a Host with userinfo, a GET with a body,
`Expect: 100-continue`) are written byte for byte on a socket.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterable
from pathlib import Path

import httpx
import pytest

from corral.web.security import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_PROXY_BODY,
    Refusal,
    check_json_body,
)
from tests.support.dashboard import AUTH
from tests.support.guarded import (
    Upstream,
    achunks,
    beat,
    chunks,
    raw_exchange,
    request_head,
    serving_app,
)

MIB = 2**20


def test_host_is_read_as_a_url_authority() -> None:
    from corral.web.security import parse_host  # new: imported here so the rest runs without

    assert parse_host("localhost") == ("localhost", None)
    assert parse_host("localhost:8080") == ("localhost", 8080)
    assert parse_host("localhost:") == ("localhost", None)  # RFC 3986: port = *DIGIT
    assert parse_host("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_host("[::1]") == ("::1", None)
    assert parse_host("[::1]:19080") == ("::1", 19080)
    assert parse_host("gpu-box.lan.") == ("gpu-box.lan.", None)
    for header, says in [
        ("127.0.0.20:19080@evil", "userinfo"),
        ("user@127.0.0.1", "userinfo"),
        ("[::1]evil", "must be followed by ':port'"),
        ("[::1]:80evil", "port"),
        ("[::1", "never closed"),
        ("[evil.example]:80", "IPv6 address"),
        ("[fe80::1%25eth0]", "IPv6 address"),
        ("::1", "more than one ':'"),
        ("::1:8080", "more than one ':'"),
        ("127.0.0.1:80:81", "more than one ':'"),
        ("localhost:8x", "port"),
        ("localhost:+80", "port"),
        ("localhost:99999", "port"),
        ("localhost:000080000", "port"),
        ("local host", "name may hold"),
        ("evil.example/x", "name may hold"),
        ("a..b", "name may hold"),
        ("", "empty"),
        ("loc\u0430lhost", "ASCII"),
        ("evil]:80", "bracket"),
    ]:
        with pytest.raises(Refusal, match="is not a host") as refused:
            parse_host(header)
        assert refused.value.status == 400
        assert says in refused.value.detail, (header, refused.value.detail)


async def test_a_host_header_that_is_not_one_host_port_is_refused(tmp_path: Path) -> None:
    async with serving_app(tmp_path) as srv:
        port = srv.port

        async def get(*hosts: str) -> tuple[int | None, str]:
            head = request_head("GET", "/api/rpc_backends", [("Host", h) for h in hosts])
            reply = await raw_exchange(srv.host, port, head)
            return reply.status, reply.text

        for host in (
            f"127.0.0.20:{port}@evil",
            f"127.0.0.1:{port}@evil.example",
            "[::1]evil",
            f"[::1]evil:{port}",
            "[::1",
            f"localhost:{port}x",
        ):
            status, text = await get(host)
            assert status == 400, (host, status, text)
            assert "is not a host[:port]" in text, (host, text)
        # Two Host headers: refused whichever comes first, even when both are loopback.
        for pair in (
            ("127.0.0.1", "evil.example"),
            ("evil.example", "127.0.0.1"),
            (f"127.0.0.1:{port}", f"127.0.0.1:{port}"),
        ):
            status, text = await get(*pair)
            assert status == 400, (pair, status, text)
            assert "2 Host headers" in text
        # What browsers and clients send still passes.
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "[::1]:1"):
            status, text = await get(host)
            assert status == 200, (host, status, text)


async def test_every_v1_request_needs_the_token(tmp_path: Path) -> None:
    async with (
        Upstream() as upstream,
        serving_app(tmp_path, coordinator_url=upstream.url) as srv,
        httpx.AsyncClient(base_url=srv.base, trust_env=False, timeout=30) as c,
    ):
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/health"),
            ("HEAD", "/v1/models"),
            ("GET", "/v1"),
            ("POST", "/v1/chat/completions"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = await c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
        assert upstream.seen == []  # nothing reached the model
        r = await c.get("/v1/models", headers=AUTH)
        assert r.status_code == 200 and r.json()["data"] == [{"id": "tiny"}]
        assert [(s.method, s.path) for s in upstream.seen] == [("GET", "/v1/models")]
        # The other reads stay open.
        assert (await c.get("/api/rpc_backends")).status_code == 200


async def test_a_huge_get_body_is_never_buffered_nor_forwarded(tmp_path: Path) -> None:
    """The tester's 200 MB `GET /v1/models` grew the process 97 -> 660 MB. Without the token
    it is refused before any of it is read; with it, it is read only to the 8 MiB cap."""
    total = 64 * MIB
    async with Upstream() as upstream, serving_app(tmp_path, coordinator_url=upstream.url) as srv:
        tracemalloc.start()
        try:
            for auth in ([], [("Authorization", AUTH["Authorization"])]):
                tracemalloc.reset_peak()
                head = request_head(
                    "GET",
                    "/v1/models",
                    [("Host", f"127.0.0.1:{srv.port}"), ("Content-Length", str(total)), *auth],
                )
                reply = await raw_exchange(srv.host, srv.port, head, chunks(total))
                peak = tracemalloc.get_traced_memory()[1]
                # Past the drain limit the server answers and closes while the client still
                # writes: the answer may be lost to the reset. Memory is what counts here.
                if reply.status is not None:
                    assert reply.status == (413 if auth else 401), reply.text
                assert peak < 24 * MIB, f"{peak / MIB:.1f} MiB held for a {total // MIB} MiB body"
        finally:
            tracemalloc.stop()
        assert upstream.seen == []


async def test_oversized_bodies_get_413_not_a_reset(tmp_path: Path) -> None:
    async with (
        Upstream() as upstream,
        serving_app(tmp_path, coordinator_url=upstream.url) as srv,
        httpx.AsyncClient(base_url=srv.base, trust_env=False, timeout=60) as c,
    ):
        json_auth = {**AUTH, "Content-Type": "application/json"}
        ten_mb = b"x" * (10 * 10**6)
        # Declared (Content-Length) and undeclared (chunked), to /api and to /v1.
        cases: list[tuple[str, bytes | AsyncIterable[bytes], int]] = [
            ("/api/nodes/heartbeat", ten_mb, DEFAULT_MAX_BODY),
            ("/api/nodes/heartbeat", achunks(len(ten_mb)), DEFAULT_MAX_BODY),
            ("/v1/chat/completions", ten_mb, DEFAULT_MAX_PROXY_BODY),
            ("/v1/chat/completions", achunks(len(ten_mb)), DEFAULT_MAX_PROXY_BODY),
        ]
        for path, content, cap in cases:
            r = await c.post(path, content=content, headers=json_auth)
            assert r.status_code == 413, (path, r.status_code, r.text)
            assert f"larger than {cap} bytes" in r.json()["detail"]
        # A body just under the /v1 cap goes through whole.
        r = await c.post("/v1/chat/completions", content=b"y" * (8 * MIB - 1), headers=json_auth)
        assert r.status_code == 200, r.text
        assert [s.body_bytes for s in upstream.seen] == [8 * MIB - 1]
        # A refused request with a body still gets its answer: 401 here.
        r = await c.post("/v1/chat/completions", content=b"z" * (4 * MIB))
        assert r.status_code == 401
        # Every route, every method: a GET with a body is held to the cap too.
        r = await c.request("GET", "/api/rpc_backends", content=b"q" * (DEFAULT_MAX_BODY + 1))
        assert r.status_code == 413 and "larger than" in r.json()["detail"]
        r = await c.request("GET", "/api/rpc_backends", content=b"small")
        assert r.status_code == 200
        # `Expect: 100-continue` and too long: refused before the body is asked for.
        head = request_head(
            "POST",
            "/api/nodes/heartbeat",
            [
                ("Host", f"127.0.0.1:{srv.port}"),
                *json_auth.items(),
                ("Content-Length", str(10 * MIB)),
                ("Expect", "100-continue"),
            ],
        )
        reply = await raw_exchange(srv.host, srv.port, head, read_first=True, seconds=10)
        assert reply.status == 413, reply
        assert await srv.store.live_nodes() == []  # nothing refused was registered


async def test_nan_and_infinity_are_refused_with_422_saying_which(tmp_path: Path) -> None:
    async with (
        serving_app(tmp_path) as srv,
        httpx.AsyncClient(base_url=srv.base, trust_env=False, timeout=10) as c,
    ):
        headers = {**AUTH, "Content-Type": "application/json"}
        good = '{"node_id":"n1","endpoint":"127.0.0.9:50052","hostname":"b","status":"ready"'
        for value, says in [
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
            ("1e999", "1e999"),
        ]:
            for field in ("uptime_s", "heartbeat_s"):
                body = f"{good},{field!r}:{value}}}".replace("'", '"')
                r = await c.post("/api/nodes/heartbeat", content=body, headers=headers)
                assert r.status_code == 422, (value, r.status_code, r.text)
                assert says in r.json()["detail"], r.text
        assert await srv.store.live_nodes() == []
        r = await c.post("/api/nodes/heartbeat", json=beat(1), headers=AUTH)
        assert r.status_code == 200, r.text


def test_json_check_is_pure() -> None:
    check_json_body(b'{"a": 1.5, "b": [1, 2e10, -0.0], "c": "NaN"}')  # a string is fine
    for body, status in [(b"NaN", 422), (b"[1, -Infinity]", 422), (b"1e400", 422), (b"{", 400)]:
        with pytest.raises(Refusal) as refused:
            check_json_body(body)
        assert refused.value.status == status
