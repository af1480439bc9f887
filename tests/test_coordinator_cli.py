"""`corral coordinator run|status|stop` and `corral model tiny` as a user runs them: real
processes, a private state directory, and every PID checked gone at the end.

Run, status and stop leave nothing running, nor do Ctrl-C or a killed `corral`; bad input is
refused before anything starts; `model tiny` writes a GGUF and says its output is nonsense."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from corral.endpoint import Endpoint
from tests.support.coordinator import chat
from tests.support.loopback import free_port
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_REDIS_URL", "SOLLOL_REDIS_URL")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    return env


async def corral(tmp_path: Path, *args: str, seconds: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral",
        *args,
        env=_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Run:
    proc: asyncio.subprocess.Process
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def coordinator_run(tmp_path: Path, port: int, *args: str) -> AsyncIterator[Run]:
    log = tmp_path / f"corral-{port}.out"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral",
            "coordinator",
            "run",
            "--port",
            str(port),
            *args,
            env=_env(tmp_path),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield Run(proc, port, log)
    finally:
        if proc.returncode is None:
            proc.kill()  # by its PID: the process this test started
            await proc.wait()


async def status(tmp_path: Path, port: int) -> dict[str, Any]:
    code, out, err = await corral(tmp_path, "coordinator", "status", "--port", str(port), "--json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


async def wait_serving(tmp_path: Path, run: Run, backends: list[Endpoint]) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def serving() -> bool:
        nonlocal last
        assert run.proc.returncode is None, run.output()
        last = await status(tmp_path, run.port)
        return bool(
            last.get("state") == "serving"
            and last.get("health") == "ready"
            and last.get("backends") == [str(b) for b in backends]
        )

    await until(serving, 30, "coordinator serving")
    return last


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_run_status_stop_leaves_nothing_running(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    b, _ = await rpc_server()
    port = free_port("127.0.0.1")
    args = ["--model", str(tiny_model), "--backend", str(a), "--backend", str(b)]
    async with coordinator_run(tmp_path, port, *args, "--tensor-split", "1,1") as run:
        info = await wait_serving(tmp_path, run, [a, b])
        llama_pid = info["pid"]
        assert info["supervisor_pid"] == run.proc.pid and info["pid_alive"]
        await chat(f"http://127.0.0.1:{port}")
        code, out, _ = await corral(tmp_path, "coordinator", "status", "--port", str(port))
        assert code == 0 and "serving" in out and str(a) in out
        code, out, err = await corral(tmp_path, "coordinator", "stop", "--port", str(port))
        assert code == 0, err
        assert f"coordinator pid {run.proc.pid} stopped" in out
        assert await asyncio.wait_for(run.proc.wait(), 10) == 0
        assert not _alive(llama_pid)
        assert not (tmp_path / "state" / "corral" / "coordinator" / f"{port}.pid").exists()
        after = await status(tmp_path, port)
        assert after["state"] == "stopped" and after["backends"] == []
        assert "llama-server pid" in run.output()
        code, out, _ = await corral(tmp_path, "coordinator", "stop", "--port", str(port))
        assert code == 0 and "no coordinator is running" in out


async def test_ctrl_c_and_a_killed_corral_leave_no_llama_server(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    for sig in (signal.SIGINT, signal.SIGKILL):
        port = free_port("127.0.0.1")
        async with coordinator_run(
            tmp_path, port, "--model", str(tiny_model), "--backend", str(a)
        ) as run:
            llama_pid = (await wait_serving(tmp_path, run, [a]))["pid"]
            run.proc.send_signal(sig)
            code = await asyncio.wait_for(run.proc.wait(), 10)
            assert code == (0 if sig is signal.SIGINT else -signal.SIGKILL)
            # SIGINT: stopped in order. SIGKILL: no cleanup ran, PR_SET_PDEATHSIG did it.
            await until(partial(_gone, llama_pid), 5, f"llama-server gone after {sig!r}")
        await until(partial(_ready, a), 10, "backend free again")


def _gone(pid: int) -> bool:
    return not _alive(pid)


async def _ready(ep: Endpoint) -> bool:
    from corral.rpc.probe import Prober
    from corral.types import Status

    return (await Prober(timeout=1.0).probe(ep)).status is Status.READY


async def test_bad_input_is_refused_before_anything_starts(
    tiny_model: Path, tmp_path: Path
) -> None:
    base = ["coordinator", "run", "--port", str(free_port("127.0.0.1"))]
    code, _, err = await corral(
        tmp_path, *base, "--model", str(tiny_model), "--backend", "coordinator:50052"
    )
    assert code == 2 and "placeholder" in err
    code, _, err = await corral(
        tmp_path, *base, "--model", str(tiny_model), "--tensor-split", "1,x"
    )
    assert code == 2 and "--tensor-split" in err
    code, _, err = await corral(tmp_path, *base, "--model", str(tmp_path / "missing.gguf"))
    assert code == 2 and "no such file" in err
    code, _, err = await corral(tmp_path, *base)
    assert code == 1 and "no model" in err


async def test_model_tiny_writes_a_gguf_and_says_it_is_nonsense(tmp_path: Path) -> None:
    path = tmp_path / "m" / "tiny.gguf"
    code, out, err = await corral(tmp_path, "model", "tiny", str(path))
    assert code == 0, err
    assert path.read_bytes()[:4] == b"GGUF"
    assert "nonsense" in out and str(path) in out
