"""`GET /api/logs`: llama-server's log, its last lines then as it grows, only with the token.

The follower is checked on real files (appended, cut, rotated, missing then created); the route
under a real `corral up` (real ggml-rpc-servers, the tiny model, a real llama-server writing its
real log), and on the real app for its refusals: no token, no coordinator, too many followers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from corral.web.logtail import CUT, Lines, follow, last_lines
from tests.support.corral_up import corral_up
from tests.support.dashboard import AUTH, TOKEN, running_dashboard
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until


def test_lines_come_whole_and_cut_at_the_cap() -> None:
    lines = Lines(max_line=8)
    assert lines.feed(b"one\r\ntw") == ["one"]
    assert lines.feed(b"o\n") == ["two"]
    assert lines.feed(b"0123456789\n") == ["01234567" + CUT]
    # A line still coming past the cap is sent cut at once; the rest of it never follows.
    assert lines.feed(b"abcdefghij") == ["abcdefgh" + CUT]
    assert lines.feed(b"klm") == []
    assert lines.feed(b"nop\nnext\n") == ["next"]
    assert lines.feed(b"\xff\xfe\n") == ["\ufffd\ufffd"]  # not UTF-8: replaced, not refused


def test_last_lines_of_a_file_end() -> None:
    assert last_lines(b"a\nb\nc\nd", at_start=True, lines=2, max_line=10) == ["b", "c"]
    assert last_lines(b"tail of a\nb\n", at_start=False, lines=5, max_line=10) == ["b"]
    assert last_lines(b"a\nb\n", at_start=True, lines=0, max_line=10) == []


async def _next(lines: AsyncIterator[str]) -> str:
    return await asyncio.wait_for(anext(lines), 5)


async def test_follow_reads_the_end_then_what_is_added_across_rotation_and_truncation(
    tmp_path: Path,
) -> None:
    log = tmp_path / "llama-server.log"
    stop = asyncio.Event()
    lines = follow(log, 2, look_s=0.01, stop=stop)
    try:
        # No file yet: waited for; its first lines arrive once it exists.
        log.write_text("first\n")
        assert await _next(lines) == "first"
        with log.open("a") as f:
            f.write("second\nthi")
        assert await _next(lines) == "second"
        with log.open("a") as f:
            f.write("rd\n")
        assert await _next(lines) == "third"
        # Rotated (as a start that finds the log oversized does): the new file from its start.
        log.replace(tmp_path / "llama-server.log.1")
        log.write_text("after rotation\n")
        assert await _next(lines) == "after rotation"
        # Cut to nothing and written again: from its start as well.
        log.write_text("")
        log.write_text("x\n")  # shorter than what was read: read from its start
        assert await _next(lines) == "x"
    finally:
        stop.set()
        await lines.aclose()

    log.write_text("".join(f"line {i}\n" for i in range(10)) + "unfinished")
    stop = asyncio.Event()
    tail = follow(log, 3, look_s=0.01, stop=stop)
    got = [await _next(tail) for _ in range(3)]
    assert got == ["line 7", "line 8", "line 9"]
    stop.set()
    with contextlib.suppress(StopAsyncIteration):
        await _next(tail)  # ends once stopped
    await tail.aclose()


async def test_logs_route_refuses_without_the_token_and_without_a_coordinator(
    tmp_path: Path,
) -> None:
    async with (
        running_dashboard(tmp_path) as dash,
        httpx.AsyncClient(base_url=dash.base, timeout=5, trust_env=False) as client,
    ):
        refused = await client.get("/api/logs")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        none = await client.get("/api/logs", headers=AUTH)
        assert none.status_code == 404
        assert "no coordinator runs in this dashboard's process" in none.json()["detail"]
        bad = await client.get("/api/logs", headers=AUTH, params={"lines": 100_000})
        assert bad.status_code == 422


async def test_logs_route_caps_its_followers(tmp_path: Path) -> None:
    log = tmp_path / "llama-server.log"
    log.write_text("hello\n")
    async with (
        running_dashboard(tmp_path, coordinator_log=log) as dash,
        httpx.AsyncClient(base_url=dash.base, timeout=5, trust_env=False) as client,
        contextlib.AsyncExitStack() as streams,
    ):
        cap = dash.app.state.corral.logs.max_clients
        open_ones = []  # (an iterator dropped would close its stream)
        for _ in range(cap):
            reply = await streams.enter_async_context(
                client.stream("GET", "/api/logs", headers=AUTH)
            )
            assert reply.status_code == 200
            open_ones.append(reply.aiter_lines())
            assert await _next(open_ones[-1]) == "hello"
        over = await client.get("/api/logs", headers=AUTH)
        assert over.status_code == 429, over.text
        assert over.headers["retry-after"] == "5"
        await streams.aclose()  # they leave: their places are free again
        await until(lambda: dash.app.state.corral.logs.clients == 0, 5, "followers to leave")
        async with client.stream("GET", "/api/logs", headers=AUTH) as again:
            assert again.status_code == 200


async def test_logs_stream_a_real_llama_servers_lines_under_corral_up(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _) = await rpc_server()
    async with corral_up(tmp_path, [a], tiny_model, token=TOKEN) as up:
        await up.wait_serving({a})
        async with up.client() as client:
            assert (await client.get("/api/logs")).status_code == 401
            wrong = {"Authorization": "Bearer not-the-token"}
            assert (await client.get("/api/logs", headers=wrong)).status_code == 401

            path = await _log_path(up.output())
            assert path.is_file(), path
            async with client.stream(
                "GET", "/api/logs", headers=AUTH, params={"lines": 20}
            ) as reply:
                assert reply.status_code == 200
                assert reply.headers["content-type"] == "text/plain; charset=utf-8"
                received = reply.aiter_lines()
                first = [await _next(received) for _ in range(20)]
                # Twenty consecutive lines of the file, as written (it may have grown since).
                lines = path.read_text(errors="replace").split("\n")
                assert any(lines[i : i + 20] == first for i in range(len(lines))), first
                assert any("listening on http://127.0.0.1:" in line for line in first), first
                # A prompt through /v1 makes llama-server log more: those lines follow.
                size = path.stat().st_size
                answer = await client.post(
                    "/v1/chat/completions",
                    headers=AUTH,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                )
                assert answer.status_code == 200, answer.text
                await until(lambda: b"\n" in path.read_bytes()[size:], 10, "llama-server to log")
                added = path.read_bytes()[size:]
                new_first = added[: added.index(b"\n")].decode(errors="replace")
                seen: list[str] = []
                while new_first not in seen:
                    seen.append(await _next(received))
                assert seen[-1] == new_first


async def _log_path(output: str) -> Path:
    """The llama-server log `corral up` announced (its `llama-server log: PATH` line)."""
    for line in output.splitlines():
        if "llama-server log: " in line:
            return Path(line.split("llama-server log: ", 1)[1].strip())
    raise AssertionError(f"corral up never named its llama-server log:\n{output}")
