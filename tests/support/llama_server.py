"""Start a real llama-server (tiny model, RPC backends) for tests, through llama.supervisor.Child.

The caller stops it with `child.stop()` (SIGTERM, then SIGKILL, by PID); use `running_llama_server`
so that happens on every exit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.supervisor import Child
from tests.support.loopback import free_port, next_loopback
from tests.support.waiting import until


async def http_status(ep: Endpoint, path: str, limit: float = 1.0) -> int | None:
    """Status code of GET `path`, or None when nothing answers (loopback only)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port), limit)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {ep}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), limit)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def running_llama_server(
    bins: LlamaBinaries,
    model: Path,
    log_dir: Path,
    *,
    rpc_flag: Sequence[Endpoint] = (),
    rpc_env: Sequence[Endpoint] = (),
    port_in_env: bool = False,
    extra: Sequence[str] = (),
    start_s: float = 30,
) -> AsyncIterator[tuple[Child, Endpoint]]:
    """A llama-server whose backends come from `--rpc` and/or LLAMA_ARG_RPC; yields once healthy.

    Healthy means /health said 200: the model is loaded, so it holds every backend it was given.
    """
    host = next_loopback()
    serve = Endpoint(host, free_port(host))
    argv = [str(bins.llama_server), "-m", str(model), "-ngl", "99", "-t", "1", "-c", "256"]
    env = dict(os.environ)
    if port_in_env:
        env["LLAMA_ARG_HOST"], env["LLAMA_ARG_PORT"] = serve.host, str(serve.port)
    else:
        argv += ["--host", serve.host, "--port", str(serve.port)]
    if rpc_flag:
        argv += ["--rpc", ",".join(map(str, rpc_flag))]
    if rpc_env:
        env["LLAMA_ARG_RPC"] = ",".join(map(str, rpc_env))
    argv += extra
    child = Child(argv, log_dir / f"llama-server-{serve.port}.log", env=env)
    await child.start()
    try:

        async def healthy() -> bool:
            if child.returncode is not None:
                raise AssertionError(f"llama-server exited {child.returncode}")
            return await http_status(serve, "/health") == 200

        try:
            await until(healthy, start_s, "llama-server /health 200")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{child.log_tail()}") from None
        yield child, serve
    finally:
        await child.stop(grace=5)
