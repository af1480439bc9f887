"""How long from a backend's death to `offline` in the dashboard's API, with real processes.

`corral up` (the real command, a subprocess) over two ggml-rpc-servers on loopback, the tiny
model forced across both. Each run kills one backend (SIGKILL, by its PID) and polls
/api/rpc_backends every 10 ms until it says `offline`; then the backend starts again on the
same address and the coordinator takes it back before the next run; the kill comes at a random
moment of the monitor's recheck period, so the worst case is about one period. Two cases:

- in use: the backend llama-server holds (the monitor never connects to it: it watches its
  listening socket; the coordinator fails over at the same time);
- free: the dashboard alone (`corral dashboard`), so the monitor's probe finds it dead.

    python3 benchmarks/death_to_offline.py --runs 5 [--recheck 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from corral.endpoint import Endpoint
from corral.llama.binaries import find_binaries
from corral.llama.supervisor import Child, rpc_server_argv
from corral.llama.tiny_model import write_tiny_model
from support import free_port, until


async def _status(client: httpx.AsyncClient, ep: Endpoint) -> str | None:
    try:
        items = (await client.get("/api/rpc_backends")).json()
    except httpx.HTTPError:
        return None
    found = [b["status"] for b in items if f"{b['host']}:{b['port']}" == str(ep)]
    return str(found[0]) if found else None


async def _case(in_use: bool, runs: int, recheck: float, tmp: Path) -> list[float]:
    bins = find_binaries()
    a = Endpoint("127.0.9.1", free_port("127.0.9.1"))
    b = Endpoint("127.0.9.2", free_port("127.0.9.2"))
    await asyncio.to_thread(tmp.mkdir, parents=True, exist_ok=True)
    conf = tmp / "rpc_backends.conf"
    await asyncio.to_thread(conf.write_text, f"{a}\n{b}\n")

    def backend(ep: Endpoint) -> Child:
        return Child(rpc_server_argv(bins.rpc_server, ep.host, ep.port, threads=1), tmp / "b.log")

    children = {a: backend(a), b: backend(b)}
    for child in children.values():
        await child.start()
    port = free_port("127.0.0.1")
    args = ["--port", str(port), "--sources", "file", "--backends-file", str(conf)]
    args += ["--recheck", str(recheck)]
    if in_use:
        model = await asyncio.to_thread(write_tiny_model, tmp / "tiny.gguf")
        args = ["up", *args, "--model", str(model), "--tensor-split", "1,1"]
        args += ["--coordinator-port", str(free_port("127.0.0.1")), "--debounce", "0.5"]
    else:
        args = ["dashboard", *args]
    env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"), XDG_CONFIG_HOME=str(tmp / "cfg"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral", *args, env=env, stdout=asyncio.subprocess.DEVNULL
    )
    times: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as c:

            async def settled() -> bool:
                want = "busy" if in_use else "ready"
                return all([await _status(c, ep) == want for ep in (a, b)])

            for _ in range(runs):
                await until(settled, 60, "both backends back")
                # At a random phase of the recheck: right after the look that saw it back,
                # every run would be the worst case.
                await asyncio.sleep(random.uniform(0, recheck))
                victim = children[b]
                os.kill(victim.pid or 0, signal.SIGKILL)
                killed = time.monotonic()

                async def offline() -> bool:
                    return await _status(c, b) == "offline"

                await until(offline, 30, f"{b} offline")
                times.append(time.monotonic() - killed)
                await victim.stop()
                children[b] = backend(b)
                await children[b].start()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # the process this benchmark started
            await proc.wait()
        for child in children.values():
            await child.stop()
    return times


def _summary(name: str, times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return (
        f"{name:7s} runs {len(ms)}  min {min(ms):6.0f} ms  median {statistics.median(ms):6.0f} ms"
        f"  max {max(ms):6.0f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--recheck", type=float, default=2.0)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        in_use = await _case(True, opts.runs, opts.recheck, Path(tmp) / "in-use")
        free = await _case(False, opts.runs, opts.recheck, Path(tmp) / "free")
    print(f"death to offline in /api/rpc_backends (recheck every {opts.recheck:g} s)")
    print(_summary("in use", in_use))
    print(_summary("free", free))


if __name__ == "__main__":
    asyncio.run(main())
