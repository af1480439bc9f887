"""Fill the backend's tensor cache with a model before any coordinator loads it.

Cold, a coordinator's load sends every weight over the network, and llama.cpp's loader does not
overlap that with its own work (measured: a 1.07 GB load over 1 Gbit/s took the link's 8.6 s
plus the 7 s the same load takes unshaped). With the backend's cache full (`-c`), the load sends
a hash per tensor over 10 MiB and the backend reads the tensor from its disk. So a node that
has the model (a local file, or fetched from the Hub over its own link) loads it once into its
own backend, over loopback: a llama-server started just for that, stopped once the model is in.
The cache is keyed by each tensor's bytes, so whatever layers the coordinator later gives this
backend hit it.

While it warms, the backend serves that llama-server: to everyone else it is busy, so no
coordinator takes it half-filled. No `-ngl`: llama-server's own fit puts as many layers on the
backend as its memory holds (an explicit one would abort a model larger than one machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.endpoint import Endpoint
from corral.llama.rpc_cache import CacheUsage, measure
from corral.llama.server import explain_log, rpc_argument, server_env
from corral.llama.supervisor import Child

log = logging.getLogger(__name__)

WARM_CTX = 256  # the smallest useful context: the KV cache is not what is being warmed
DEFAULT_STALL_S = 60.0  # no growth of the cache and no word from llama-server for this long


class WarmError(RuntimeError):
    """The warm-up did not finish; the message says why (the backend still serves)."""


@dataclass(frozen=True, slots=True)
class Warmed:
    seconds: float
    before: CacheUsage
    after: CacheUsage

    def describe(self) -> str:
        added = (self.after.bytes - self.before.bytes) / 1024**2
        return (
            f"cache warmed in {self.seconds:.1f} s: +{added:.1f} MiB (now {self.after.describe()})"
        )


def warm_argv(llama_server: Path, model: Path, backend: Endpoint, port: int) -> list[str]:
    """Pure: the llama-server that loads `model` into `backend` and serves nothing else."""
    return [
        str(llama_server),
        "-m",
        str(model),
        "--rpc",
        rpc_argument([backend]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(WARM_CTX),
        "-np",
        "1",
        "--no-warmup",
    ]


async def warm_cache(
    llama_server: Path,
    model: Path,
    backend: Endpoint,
    cache_dir: Path,
    log_path: Path,
    *,
    env: dict[str, str],
    stall_s: float = DEFAULT_STALL_S,
    clock: Callable[[], float] = time.monotonic,
) -> Warmed:
    """Load `model` into `backend` once, then stop. Raises WarmError when llama-server exits
    before the model is in, or nothing moves (the cache, its log) for `stall_s`."""
    started = clock()
    before = await asyncio.to_thread(measure, cache_dir)
    port = await asyncio.to_thread(_free_port)
    child = Child(warm_argv(llama_server, model, backend, port), log_path, server_env(env))
    offset = await asyncio.to_thread(_size, log_path)
    await child.start()
    try:
        await _until_loaded(child, port, cache_dir, log_path, stall_s, clock)
    finally:
        await child.stop(grace=5.0)
    after = await asyncio.to_thread(measure, cache_dir)
    warmed = Warmed(clock() - started, before, after)
    if after.bytes <= before.bytes:
        why = explain_log(await asyncio.to_thread(_read_from, log_path, offset))
        log.warning("node: warming added nothing to %s (%s)", cache_dir, why or "no reason given")
    return warmed


async def _until_loaded(
    child: Child,
    port: int,
    cache_dir: Path,
    log_path: Path,
    stall_s: float,
    clock: Callable[[], float],
) -> None:
    url = f"http://127.0.0.1:{port}/health"
    seen: tuple[int, int] | None = None
    moved_at = clock()
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
        while True:
            if child.returncode is not None:
                why = explain_log(await asyncio.to_thread(child.log_tail, 40))
                raise WarmError(f"llama-server exited ({child.returncode}) while warming: {why}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            now = (
                (await asyncio.to_thread(measure, cache_dir)).bytes,
                await asyncio.to_thread(_size, log_path),
            )
            if now != seen:
                seen, moved_at = now, clock()
            elif clock() - moved_at >= stall_s:
                raise WarmError(f"warming made no progress for {stall_s:g} s")
            await asyncio.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int, limit: int = 256 * 1024) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""
