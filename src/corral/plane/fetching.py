"""`corral up` fetching its model from Hugging Face while the dashboard already answers: the
coordinator is `waiting`, its reason the download's progress, at most PUBLISH_EVERY_S apart.

The download runs in a thread (corral.models.fetch); its progress crosses to the loop with
call_soon_threadsafe, and only the latest is published. `stop` ends the wait at once and the
thread at its next chunk; what it fetched stays in the cache for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from corral.coordinator.publish import Publisher, Say
from corral.models.fetch import Download, download_async
from corral.models.progress import Speed, describe
from corral.types import CoordinatorState

PUBLISH_EVERY_S = 0.5  # the page redraws from the store: a few times a second is plenty


async def fetch_model(
    plan: Download,
    publish: Publisher,
    stop: asyncio.Event,
    say: Say,
    clock: Callable[[], float] = time.monotonic,
) -> Path | None:
    """The first part's local path; None if `stop` came first. Raises ModelError."""
    loop = asyncio.get_running_loop()
    latest: list[tuple[int, int | None]] = []
    changed = asyncio.Event()

    def progress(done: int, total: int | None) -> None:  # called in the download's thread
        loop.call_soon_threadsafe(_note, done, total)

    def _note(done: int, total: int | None) -> None:
        latest[:] = [(done, total)]
        changed.set()

    say(f"fetching {plan.what} into {plan.settings.cache_dir}")
    if plan.note:
        say(plan.note)
    fetching = asyncio.create_task(download_async(plan, progress))
    showing = asyncio.create_task(_show(plan.what, latest, changed, publish, clock))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({fetching, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (showing, stopped, fetching):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                if task is not fetching:
                    await task
    if not fetching.done() or fetching.cancelled():
        return None
    path = fetching.result()  # raises what the download raised
    say(f"model: {path}")
    return path


async def _show(
    what: str,
    latest: list[tuple[int, int | None]],
    changed: asyncio.Event,
    publish: Publisher,
    clock: Callable[[], float],
) -> None:
    speed = Speed()
    while True:
        await changed.wait()
        changed.clear()
        done, total = latest[0]
        speed.add(clock(), done)
        line = describe(what, done, total, speed.rate())
        await publish.state(CoordinatorState.WAITING, backends=(), reason=line)
        await asyncio.sleep(PUBLISH_EVERY_S)  # a pace, not a wait for something
