"""How the monitor and the dashboard meet an in-process coordinator.

- `RunnerMonitor`: the monitor, told what the coordinator holds by the Runner itself rather than
  by the store. The store's record lags: after llama-server stops it still names the old set
  ("restarting"), and with one prober shared, holding those would make the Runner's own probes
  of the freed backends answer "busy (not probed)" and start without them.
- `MonitorRescan`: the dashboard's rescan: ask the monitor for a discovery run, and return once
  the run that answers it is complete and written to the store. POST /api/rescan itself answers
  202 at once (web/app.py runs this in the background); /api/metrics shows `scans.running`
  until it returns, then `scans.completed` (or `failed`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.endpoint import Endpoint
from corral.monitor import Monitor


def _nothing_held() -> frozenset[Endpoint]:
    return frozenset()


@dataclass
class RunnerMonitor(Monitor):
    held_now: Callable[[], frozenset[Endpoint]] = field(default=_nothing_held)

    async def _held(self) -> set[Endpoint]:
        # No await: the monitor writes this into the shared prober in the same step, so it is
        # never older than what the Runner holds at that moment.
        return set(self.held_now())


@dataclass
class MonitorRescan:
    """A `web.control.Rescan`. The monitor folds a request that comes during a run into that run
    (it clears its flag after each run), so "the run that answers it" is the next one to end."""

    monitor: Monitor
    timeout_s: float = 120.0
    poll_s: float = 0.05

    async def __call__(self) -> None:
        before = self.monitor.stats.scans
        self.monitor.request_rescan()
        deadline = time.monotonic() + self.timeout_s
        while self.monitor.stats.scans == before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no discovery run completed within {self.timeout_s:g} s")
            await asyncio.sleep(self.poll_s)
        # The count moves just before the run's results are written, under the monitor's lock
        # (asyncio locks are FIFO, and the run asks for it first): once we hold it, they are in.
        async with self.monitor._lock:
            pass


async def first_discovery(monitor: Monitor, timeout_s: float) -> bool:
    """Wait for the monitor's first discovery run (the coordinator's first start should see its
    results, not an empty store). False if it did not complete in time."""
    deadline = time.monotonic() + timeout_s
    while monitor.stats.scans == 0:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
