"""Waiting on a condition instead of on the wall clock.

`until` polls a condition (plain or async) until it holds, and fails with what never happened
once its bound runs out: for outside processes, whose progress a test can only look at. The
bound is how long to wait at most, never how long a thing should take, so a loaded machine makes
a test slower, not red. In-process behaviour is better awaited directly (an event, a future).

`holds_for` is the other half, for "and nothing more happens": it checks a condition over a
window and fails at the first moment it does not hold. Load only shortens what the window
covers; it can never make a correct program fail.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], Awaitable[object] | object]

POLL_S = 0.05


async def _holds(check: Check) -> bool:
    result = check()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


async def until(check: Check, seconds: float, what: str) -> float:
    """Poll `check` until it is true; return the seconds that took. Fails naming `what`."""
    start = time.monotonic()
    while True:
        if await _holds(check):
            return time.monotonic() - start
        if time.monotonic() - start >= seconds:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def holds_for(check: Check, seconds: float, what: str) -> None:
    """Check `check` over `seconds`; fail at the first moment it is false, naming `what`."""
    start = time.monotonic()
    while True:
        if not await _holds(check):
            raise AssertionError(f"{what} stopped holding after {time.monotonic() - start:.2f} s")
        if time.monotonic() - start >= seconds:
            return
        await asyncio.sleep(POLL_S)
