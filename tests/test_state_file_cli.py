"""One state across processes: `corral dashboard` keeps its state file true when someone
replaces or truncates it under it, and `corral backends` on the same state directory agrees
with it, in bounded time, without a traceback.

Real processes: a ggml-rpc-server on loopback, the dashboard (monitor included) discovering it
from a backends file only, and the console script as a one-shot command, all on one private
state directory. Every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from corral.endpoint import Endpoint
from tests.support.corral_cli import Run, corral, corral_script, isolated_env
from tests.support.loopback import free_port
from tests.support.rpc_backends import StartRpc
from tests.support.state_files import write_foreign_database
from tests.support.waiting import holds_for, until

pytestmark = pytest.mark.timeout(120)

NOTICE_S = 15.0  # the dashboard checks its file every 2 s; the bound is for a loaded machine


@dataclass
class Dashboard:
    proc: asyncio.subprocess.Process
    base: str
    log: Path
    env: dict[str, str]
    state: Path  # its state file

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def backends(self) -> set[str]:
        async with httpx.AsyncClient(base_url=self.base, timeout=10, trust_env=False) as c:
            reply = await c.get("/api/rpc_backends")
        reply.raise_for_status()
        return {f"{b['host']}:{b['port']}" for b in reply.json()}


@asynccontextmanager
async def dashboard(tmp_path: Path, ep: Endpoint) -> AsyncIterator[Dashboard]:
    state_home = tmp_path / "xdg"
    env = isolated_env(state_home)
    port = free_port("127.0.0.1")
    conf = tmp_path / "backends.conf"
    conf.write_text(f"{ep}\n")
    log = tmp_path / "dashboard.out"
    args = ["--port", str(port), "--sources", "file", "--backends-file", str(conf)]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            corral_script(),
            "dashboard",
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    dash = Dashboard(proc, f"http://127.0.0.1:{port}", log, env, state_home / "corral/state.db")
    try:

        async def knows_it() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"the dashboard exited {proc.returncode}:\n{dash.output()}")
            try:
                return str(ep) in await dash.backends()
            except httpx.HTTPError:
                return False

        await until(knows_it, 30, f"the dashboard listing {ep}")
        yield dash
    finally:
        if proc.returncode is None:
            proc.kill()  # by its PID: the process this test started
            await proc.wait()


async def backends_from_cache(dash: Dashboard) -> tuple[Run, float]:
    start = time.monotonic()
    run = await corral("backends", "--json", "--sources", "cache", env=dash.env)
    return run, time.monotonic() - start


async def test_a_state_file_replaced_under_the_dashboard_is_put_back_and_commands_agree(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    ep, _ = await rpc_server()
    async with dashboard(tmp_path, ep) as dash:
        other = dash.state.with_name("other.db")
        write_foreign_database(other)
        os.replace(other, dash.state)  # what a restore from a backup, or a mistake, does
        said = "was replaced by another file"
        await until(lambda: said in dash.output(), NOTICE_S, "the dashboard saying so")

        run, took = await backends_from_cache(dash)
        assert run.code == 0 and "Traceback" not in run.err, run.err
        assert took < 20, took
        listed = {f"{b['host']}:{b['port']}" for b in run.json()}
        assert str(ep) in listed  # the command reads the state the dashboard writes
        assert listed == await dash.backends()
        # Said once: the file at the path stays the dashboard's.
        await holds_for(lambda: dash.output().count(said) == 1, 3, "one warning")
        assert "Traceback" not in dash.output()


async def test_a_state_file_truncated_under_the_dashboard_costs_a_command_seconds_not_a_trace(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    """Before: every `corral backends` took 12 s and died with "database is locked" until the
    dashboard restarted. Now the command waits for the dashboard to put the file back."""
    ep, _ = await rpc_server()
    async with dashboard(tmp_path, ep) as dash:
        os.truncate(dash.state, 0)
        run, took = await backends_from_cache(dash)
        assert "Traceback" not in run.err, run.err
        assert took < 10, took
        assert run.code == 0, run.err
        assert str(ep) in {f"{b['host']}:{b['port']}" for b in run.json()}
        assert "was truncated to 0 bytes" in dash.output()
        assert "Traceback" not in dash.output()
