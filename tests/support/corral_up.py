"""`corral up` as a user runs it, for tests that look at what it serves; and another client
holding a real ggml-rpc-server.

- `corral_up(tmp_path, backends, model, *extra, token=...)`: the real command in a subprocess, the
  backends listed in a file (the only source: never the default chain, which would browse mDNS
  and scan this machine's networks), its own state and config directories. Yields once its
  dashboard answers; stops it, and whatever children it left, by PID.
- `held_by_another_client(ep)`: a plain TCP client that says HELLO to a ggml-rpc-server and
  keeps the connection. A ggml-rpc-server serves one client at a time, so while this holds it,
  everyone else finds it busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from corral.endpoint import Endpoint
from corral.rpc import protocol
from tests.support.corral_cli import isolated_env
from tests.support.loopback import free_port
from tests.support.waiting import until


@dataclass
class Up:
    proc: asyncio.subprocess.Process
    base: str
    coordinator_port: int
    log: Path
    conf: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=10, trust_env=False)

    async def get(self, path: str) -> Any:
        async with self.client() as c:
            reply = await c.get(path)
        reply.raise_for_status()
        return reply.json()

    async def coordinator(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.get("/api/coordinator")
        return data

    async def backends(self) -> dict[str, dict[str, Any]]:
        return {f"{b['host']}:{b['port']}": b for b in await self.get("/api/rpc_backends")}

    async def wait_serving(self, want: set[Endpoint], seconds: float = 20) -> dict[str, Any]:
        last: dict[str, Any] = {}

        async def serving() -> bool:
            nonlocal last
            last = await self.coordinator()
            return last["state"] == "serving" and set(last["backends"]) == {str(e) for e in want}

        try:
            await until(serving, seconds, f"serving with {sorted(map(str, want))}")
        except AssertionError:
            raise AssertionError(f"last: {last}\n{self.output()}") from None
        return last


@asynccontextmanager
async def corral_up(
    tmp_path: Path,
    backends: list[Endpoint],
    model: Path,
    *extra: str,
    token: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Up]:
    """`port`: the dashboard's (else a free one); `env`: more environment for the process."""
    port, cport = port or free_port("127.0.0.1"), free_port("127.0.0.1")
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text("".join(f"{b}\n" for b in backends))
    log = tmp_path / f"up-{port}.out"
    child_env = {**isolated_env(tmp_path / "state"), **(env or {})}
    child_env["CORRAL_TOKEN"] = token
    args = ["--port", str(port), "--coordinator-port", str(cport), "--sources", "file"]
    args += ["--backends-file", str(conf), "--model", str(model)]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral",
            "up",
            *args,
            *extra,
            env=child_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    up = Up(proc, f"http://127.0.0.1:{port}", cport, log, conf)
    children: set[int] = set()
    try:

        async def answers() -> bool:
            children.update(children_of(proc.pid))
            if proc.returncode is not None:
                raise AssertionError(f"corral up exited {proc.returncode}:\n{up.output()}")
            try:
                await up.get("/healthz")
            except httpx.HTTPError:
                return False
            return True

        await until(answers, 20, "the dashboard of corral up")
        yield up
    finally:
        children.update(children_of(proc.pid))
        if proc.returncode is None:
            proc.kill()  # by its PID: the process this test started
            await proc.wait()
        for pid in children:  # its llama-servers die with it; make sure, by their PIDs
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def children_of(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@asynccontextmanager
async def held_by_another_client(ep: Endpoint, seconds: float = 10) -> AsyncIterator[None]:
    """Hold `ep` (a ggml-rpc-server): connected, HELLO answered (so this connection is the one
    it serves, not one queued behind another), kept open until the block ends."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port), seconds)
    try:
        writer.write(protocol.encode_hello())
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(protocol.SIZE_FIELD), seconds)
        protocol.decode_size(header, protocol.HELLO_REPLY_SIZE, "HELLO")
        payload = await asyncio.wait_for(reader.readexactly(protocol.HELLO_REPLY_SIZE), seconds)
        protocol.decode_hello(payload)
        yield
    finally:
        writer.close()  # every request was answered: a plain close is harmless to the server
        with contextlib.suppress(OSError):
            await writer.wait_closed()
