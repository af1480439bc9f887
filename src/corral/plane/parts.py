"""How the monitor and the dashboard meet an in-process coordinator.

- the monitor is told what the coordinator holds by the Runner itself (`Monitor.held_now`)
  rather than by the store, whose record lags a restart.
- `MonitorRescan`: the dashboard's rescan: ask the monitor for a discovery run, and return once
  the run that answers it is complete and written to the store. POST /api/rescan itself answers
  202 at once (web/app.py runs this in the background); /api/metrics shows `scans.running`
  until it returns, then `scans.completed` (or `failed`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from corral.monitor import Monitor


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


async def first_discovery(monitor: Monitor, timeout_s: float) -> bool:
    """Wait for the monitor's first discovery run (the coordinator's first start should see its
    results, not an empty store). False if it did not complete in time."""
    deadline = time.monotonic() + timeout_s
    while monitor.stats.scans == 0:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
