"""`corral backends` with its store: the last known view first (stale), then verified and kept.

The real console script as a subprocess, each test with its own XDG_STATE_HOME (so its own
embedded store), and only `--sources` naming a backends file or the store: nothing here probes
anything but loopback.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral.endpoint import Endpoint
from tests.support import fake_servers
from tests.support.corral_cli import corral, corral_script, isolated_env
from tests.support.fake_servers import fake_server
from tests.support.rpc_backends import StartRpc

PROBE_TIMEOUT = 2.0  # a silent (busy-looking) backend takes this long to verify


@dataclass
class Streamed:
    code: int
    lines: list[tuple[float, str]]  # (seconds since start, line) as stdout produced them
    err: str
    seconds: float

    @property
    def out(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, text: str) -> float:
        """When the first line containing `text` came out."""
        for at, line in self.lines:
            if text in line:
                return at
        raise AssertionError(f"no line with {text!r} in:\n{self.out}")


async def streamed(*args: str, env: dict[str, str]) -> Streamed:
    """Run `corral ARGS`, timing each stdout line as it comes (rich flushes every print)."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        corral_script(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[tuple[float, str]] = []

    async def read_out() -> None:
        assert proc.stdout is not None
        while raw := await proc.stdout.readline():
            lines.append((time.monotonic() - start, raw.decode().rstrip("\n")))

    try:
        _, err, code = await asyncio.wait_for(
            asyncio.gather(read_out(), proc.stderr.read(), proc.wait()), 60
        )
    except TimeoutError:
        proc.kill()  # our own child, by PID
        await proc.wait()
        raise
    return Streamed(code, lines, err.decode(), time.monotonic() - start)


def table_rows(text: str) -> dict[str, str]:
    """endpoint -> status, from the rows of the rich table(s) in `text`."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[1] and cells[1] != "endpoint":
            rows[cells[1]] = cells[2]
    return rows


def json_items(out: str) -> dict[str, dict[str, Any]]:
    items = json.loads(out)  # the whole of stdout: no table may precede the JSON
    assert isinstance(items, list)
    return {f"{i['host']}:{i['port']}": i for i in items}


async def test_last_known_view_comes_at_once_then_the_verified_one(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    env = isolated_env(tmp_path / "state")
    conf = tmp_path / "rpc_backends.conf"
    ready, child = await rpc_server()
    async with fake_server(fake_servers.silent()) as quiet:
        conf.write_text(f"{ready}\n{quiet.endpoint}\n")
        common = ["--timeout", str(PROBE_TIMEOUT)]

        # First run, nothing known yet: no stale view, only the verified one.
        first = await streamed("backends", "--sources", "file", "--backends-file", str(conf),
                               *common, env=env)  # fmt: skip
        assert first.code == 0, first.err
        assert "Last known view" not in first.out
        assert first.first("RPC backends") >= 0

        await child.stop(grace=3)  # the ready one dies before the next look

        # Later, a new process: the last known view at once, then verification says otherwise.
        second = await streamed("backends", "--sources", "cache", *common, env=env)
        assert second.code == 0, second.err
        stale_at = second.first("Last known view (stale; verifying now...)")
        fresh_at = second.first("RPC backends")
        # The silent backend holds verification for PROBE_TIMEOUT; the stale view must not wait.
        assert fresh_at - stale_at >= PROBE_TIMEOUT * 0.75, second.lines
        stale = "\n".join(line for at, line in second.lines if stale_at <= at < fresh_at)
        fresh = "\n".join(line for at, line in second.lines if at >= fresh_at)
        assert table_rows(stale) == {str(ready): "ready", str(quiet.endpoint): "busy"}, stale
        assert table_rows(fresh) == {str(ready): "offline", str(quiet.endpoint): "busy"}, fresh

        # The verified view was kept: --json shows it, and nothing but JSON on stdout.
        third = await corral("backends", "--sources", "cache", *common, "--json", env=env)
    assert third.code == 0, third.err
    items = json_items(third.out)
    assert items[str(ready)]["status"] == "offline"
    assert items[str(quiet.endpoint)]["status"] == "busy"
    assert items[str(ready)]["sources"] == ["cache"]


async def test_sources_choose_and_order_the_chain(rpc_server: StartRpc, tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    conf = tmp_path / "rpc_backends.conf"
    ep, _ = await rpc_server()
    conf.write_text(f"{ep}\n")
    seed = await corral("backends", "--sources", "file", "--backends-file", str(conf), env=env)
    assert seed.code == 0, seed.err

    for order in (["cache", "file"], ["file", "cache"]):
        run = await corral(
            "backends", "--sources", " , ".join(order), "--backends-file", str(conf), env=env
        )
        assert run.code == 0, run.err
        assert f"Coordinator set (from source '{order[0]}'): {ep}" in run.out
        args = ["--sources", ",".join(order), "--backends-file", str(conf), "--json"]
        as_json = json_items((await corral("backends", *args, env=env)).out)
        assert as_json[str(ep)]["sources"] == order


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("registry,bogus", "--sources: unknown source 'bogus' (known: process, file, registry,"),
        ("cache,", "--sources: unknown source ''"),
        ("Registry", "--sources: unknown source 'Registry'"),
        ("cache,registry,cache", "--sources: 'cache' given twice"),
    ],
)
async def test_bad_sources_exit_2_with_the_reason_before_anything_runs(
    sources: str, message: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    run = await corral("backends", "--sources", sources, "--json", env=isolated_env(state))
    assert run.code == 2, (run.code, run.out, run.err)
    assert run.out == ""
    assert run.err.startswith("error: ") and message in run.err, run.err
    assert not (state / "corral").exists(), "a store was opened for a command that was refused"


async def test_poisoned_embedded_store_rows_are_dropped_with_what_and_where(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    env = isolated_env(tmp_path / "state")
    conf = tmp_path / "rpc_backends.conf"
    ep, _ = await rpc_server()
    conf.write_text(f"{ep}\n")
    seed = await corral("backends", "--sources", "file", "--backends-file", str(conf), env=env)
    assert seed.code == 0, seed.err

    good_row = Endpoint("10.0.0.4", 50052)
    db = tmp_path / "state" / "corral" / "state.db"
    with sqlite3.connect(db) as conn:
        query = "SELECT body FROM backends WHERE endpoint = ?"
        (body,) = conn.execute(query, (str(ep),)).fetchone()
        placeholder = json.loads(body) | {"endpoint": "coordinator:0"}
        wrong_type = json.loads(body) | {"endpoint": str(good_row), "last_seen": "yesterday"}
        conn.executemany(
            "INSERT INTO backends (endpoint, body) VALUES (?, ?)",
            [
                ("10.0.0.1:50052", "{junk"),
                ("10.0.0.2:50052", "[" * 70_000),
                ("10.0.0.3:50052", json.dumps(placeholder)),
                (str(good_row), json.dumps(wrong_type)),
            ],
        )

    run = await corral("backends", "--sources", "cache", "--json", env=env)
    assert run.code == 0, run.err
    assert list(json_items(run.out)) == [str(ep)]
    warnings = [line for line in run.err.splitlines() if line.startswith("warning: ")]
    for row, why in [
        ("'10.0.0.1:50052'", "not JSON"),
        ("'10.0.0.2:50052'", "larger than"),
        ("'10.0.0.3:50052'", "placeholder host"),
        (f"'{good_row}'", "field 'last_seen'"),
    ]:
        assert any(f"state.db table backends row {row}" in w and why in w for w in warnings), (
            row,
            run.err,
        )
