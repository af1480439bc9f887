"""The main job for now: two local backends, and the discovery chain finding them."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from rich.console import Console

from corral.chain import ChainOptions, build_chain
from corral.discovery import Discovery
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.model import SourceName, Status
from corral.output import print_backends
from corral.paths import state_dir
from corral.rpc.probe import Prober
from corral.supervisor import Child, rpc_server_argv

DEMO_BACKENDS = (Endpoint("127.0.0.45", 50052), Endpoint("127.0.0.46", 50052))
DEMO_DEAD = Endpoint("127.0.0.47", 50052)  # listed in the file, nothing runs there
DEMO_CIDR = "127.0.0.40/29"


async def _wait_ready(prober: Prober, ep: Endpoint, seconds: float) -> bool:
    for _ in range(int(seconds / 0.1)):
        if (await prober.probe(ep)).status is Status.READY:
            return True
        await asyncio.sleep(0.1)
    return False


async def run_demo(binaries: LlamaBinaries, console: Console, keep: bool) -> int:
    logs = state_dir() / "demo"
    children = [
        Child(rpc_server_argv(binaries.rpc_server, ep.host, ep.port), logs / f"{ep.host}.log")
        for ep in DEMO_BACKENDS
    ]
    prober = Prober(timeout=1.0)
    try:
        for child, ep in zip(children, DEMO_BACKENDS, strict=True):
            await child.start()
            if not await _wait_ready(prober, ep, 10):
                console.print(f"[red]backend {ep} did not come up[/]; log:\n{child.log_tail()}")
                return 1
            console.print(f"started ggml-rpc-server pid {child.pid} on {ep}")
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "rpc_backends.conf"
            conf.write_text(
                "# demo backends file\n"
                f"{DEMO_BACKENDS[0]}\n"
                f"{DEMO_DEAD}   # listed, but nothing runs here\n"
            )
            console.print(
                f"backends file lists {DEMO_BACKENDS[0]} and {DEMO_DEAD}; "
                f"scanning {DEMO_CIDR} on port 50052\n"
            )
            options = ChainOptions(backends_file=str(conf), cidrs=[DEMO_CIDR])
            chain = build_chain([SourceName.FILE, SourceName.SCAN], options, prober)
            result = await Discovery(chain, prober).run()
        print_backends(console, result.backends, "corral backends")
        if result.deciding_source:
            chosen = ",".join(map(str, result.chosen))
            console.print(f"coordinator set (from {result.deciding_source}): {chosen}")
        found = {b.endpoint for b in result.backends if b.probe and b.probe.status is Status.READY}
        if not set(DEMO_BACKENDS) <= found:
            console.print("[red]the demo backends were not all found ready[/]")
            return 1
        if keep:
            console.print("backends keep running; Ctrl-C stops them")
            await asyncio.Event().wait()
        return 0
    finally:
        for child in children:
            await child.stop()
