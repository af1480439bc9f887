"""Small helpers the benchmark scripts share (run as `python3 benchmarks/X.py`, this directory
is on sys.path)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def until(
    check: Callable[[], Awaitable[bool]], seconds: float, what: str, poll_s: float = 0.01
) -> float:
    """Wait until `check()` is true; return how long it took, or raise TimeoutError naming it."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"timed out after {seconds:g} s waiting for {what}")
