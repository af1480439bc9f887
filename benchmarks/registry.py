"""How fast the registry follows nodes: a dead node gone, a new node there. Real processes.

Each run starts a real `corral node` (a subprocess, which starts its own ggml-rpc-server) on a
fresh loopback address, heartbeating into a private redis-server on loopback (or the one given
with --redis, or the embedded SQLite store with --embedded), and watches the registry source
(`RegistrySource.collect()` over the store, every 10 ms):

- appear: from starting the node process until the registry lists its backend (interpreter start,
  backend start and the first beat included), and until it lists it `ready`;
- gone: the node is killed with SIGKILL at a random point of its heartbeat period (so the kill
  lands anywhere between two beats); time until the registry no longer lists it. Its TTL is three
  heartbeats from its last beat, so this is between two and three heartbeats.

Target: both within three heartbeats (6 s at the default 2 s heartbeat).

    python3 benchmarks/registry.py                      # 5 runs, heartbeat 2 s: about 1 minute
    python3 benchmarks/registry.py --runs 10 --heartbeat 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

from corral.endpoint import Endpoint
from corral.llama.supervisor import Child
from corral.sources.registry import RegistrySource
from corral.store.base import MISSED_BEATS, Store
from corral.store.redis import RedisStore
from corral.store.sqlite import EmbeddedStore
from corral.types import Status
from support import free_port, until

POLL_S = 0.01


def _corral() -> str:
    beside = Path(sys.executable).parent / "corral"
    found = str(beside) if beside.is_file() else shutil.which("corral")
    if not found:
        raise SystemExit("the `corral` console script is not installed (pip install -e .)")
    return found


@contextlib.asynccontextmanager
async def private_redis(workdir: Path) -> AsyncIterator[str]:
    """A redis-server on loopback, no persistence, stopped by its PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install it, pass --redis URL, or --embedded")
    port = free_port("127.0.0.1")
    child = Child(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        workdir / "redis.log",
    )  # fmt: skip
    await child.start()
    url = f"redis://127.0.0.1:{port}/0"
    store = RedisStore(url)
    try:
        await until(lambda: _pings(store), 5, "redis-server answering", poll_s=POLL_S)
    finally:
        await store.close()
    try:
        yield url
    finally:
        await child.stop(grace=5)


async def _pings(store: RedisStore) -> bool:
    try:
        await store.ping()
    except Exception:
        return False
    return True


class Bench:
    def __init__(self, workdir: Path, heartbeat: float, redis_url: str | None) -> None:
        self.workdir = workdir
        self.heartbeat = heartbeat
        self.redis_url = redis_url
        self.state = workdir / "state"  # one machine: nodes and the watcher share it
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CORRAL_", "SOLLOL_")) or k == "CORRAL_LLAMA_BIN_DIR"
        }
        self.env["XDG_STATE_HOME"] = str(self.state)

    async def open_store(self) -> Store:
        if self.redis_url:
            return RedisStore(self.redis_url)
        return await EmbeddedStore.open(self.state / "corral" / "state.db")

    async def one_run(self, n: int, store: Store) -> tuple[float, float, float]:
        host = f"127.0.{60 + n // 200}.{2 + n % 200}"
        ep = Endpoint(host, free_port(host))
        argv = [
            _corral(), "node", "--host", ep.host, "--port", str(ep.port),
            "--heartbeat", str(self.heartbeat), "--threads", "1", "--no-mdns",
            *(["--redis", self.redis_url] if self.redis_url else []),
        ]  # fmt: skip
        child = Child(argv, self.workdir / f"node-{n}.log", env=self.env)
        source = RegistrySource(store)

        async def listed() -> bool:
            return any(s.endpoint == ep for s in (await source.collect()).sightings)

        async def ready() -> bool:
            regs = [r for r in await store.live_nodes() if r.endpoint == ep]
            return bool(regs) and regs[0].status is Status.READY

        started = time.monotonic()
        await child.start()
        backend: list[int] = []
        try:
            appear = await until(listed, 30, f"{ep} in the registry", poll_s=POLL_S)
            await until(ready, 30, f"{ep} ready", poll_s=POLL_S)
            to_ready = time.monotonic() - started
            assert child.pid is not None
            backend = [p.pid for p in psutil.Process(child.pid).children()]
            # Kill anywhere in the heartbeat period, not always right after a beat.
            await asyncio.sleep(self.heartbeat * (1 + random.random()))
            os.kill(child.pid, signal.SIGKILL)  # the node process this run started
            killed = time.monotonic()

            async def gone() -> bool:
                return not await listed()

            await until(gone, self.heartbeat * MISSED_BEATS + 10, f"{ep} gone", poll_s=POLL_S)
            gone_s = time.monotonic() - killed
        finally:
            await child.stop(grace=2)
            for pid in backend:  # died with its node (PR_SET_PDEATHSIG); make sure
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).wait(5)
        return appear, to_ready, gone_s

    async def run(self, runs: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"appear": [], "ready": [], "gone": []}
        store = await self.open_store()
        try:
            for n in range(runs):
                appear, ready, gone = await self.one_run(n, store)
                out["appear"].append(appear)
                out["ready"].append(ready)
                out["gone"].append(gone)
                print(
                    f"run {n + 1}: listed after {appear:.2f} s, ready after {ready:.2f} s, "
                    f"gone {gone:.2f} s after SIGKILL",
                    flush=True,
                )
        finally:
            await store.close()
        return out


def _summary(name: str, values: list[float]) -> str:
    return (
        f"{name:<40} n={len(values):<3} min {min(values):.2f} s   "
        f"median {statistics.median(values):.2f} s   max {max(values):.2f} s"
    )


async def _main(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    if args.embedded:
        return await Bench(workdir, args.heartbeat, None).run(args.runs)
    if args.redis:
        return await Bench(workdir, args.heartbeat, args.redis).run(args.runs)
    async with private_redis(workdir) as url:
        return await Bench(workdir, args.heartbeat, url).run(args.runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds (default 2)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis", help="an existing Redis (default: a private one on loopback)")
    where.add_argument("--embedded", action="store_true", help="the embedded SQLite store")
    args = parser.parse_args()
    if args.runs < 1 or not 0.1 <= args.heartbeat <= 60:
        parser.error("--runs at least 1, --heartbeat 0.1 to 60 seconds")
    store = "embedded SQLite" if args.embedded else f"redis {args.redis or '(private, loopback)'}"
    print(f"heartbeat {args.heartbeat:g} s, {store}, {args.runs} runs", flush=True)
    with tempfile.TemporaryDirectory(prefix="corral-bench-registry-") as tmp:
        out = asyncio.run(_main(args, Path(tmp)))
    print()
    print(_summary("new node listed (process start ->)", out["appear"]))
    print(_summary("new node ready (process start ->)", out["ready"]))
    print(_summary("dead node gone (SIGKILL ->)", out["gone"]))
    target = args.heartbeat * MISSED_BEATS
    worst = max(out["ready"] + out["gone"])
    verdict = "meets" if worst <= target else "MISSES"
    print(f"target both <= {target:g} s (3 heartbeats): {verdict} (worst {worst:.2f} s)")
    return 0 if worst <= target else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
