"""How the dashboard waits on the monitor.

- `MonitorRescan`: the dashboard's rescan: ask the monitor for a discovery run, and return once
  the run that answers it is complete and written to the store. POST /api/rescan itself answers
  202 at once (the web runs this in the background); /api/metrics shows `scans.running`
  until it returns, then `scans.completed` (or `failed`).
- `first_discovery`: the coordinator's first start waits for the monitor's first run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from corral.monitor import Monitor


@dataclass
class MonitorRescan:
    """A `web.control.Rescan`. The monitor folds a request that comes during a run into that run
    (it clears its flag after each run), so "the run that answers it" is the next one to end."""

    monitor: Monitor
    timeout_s: float = 120.0

    async def __call__(self) -> None:
        before = self.monitor.stats.scans
        self.monitor.request_rescan()
        try:
            await asyncio.wait_for(self.monitor.wait_scan(after=before), self.timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no discovery run completed within {self.timeout_s:g} s") from None


async def first_discovery(monitor: Monitor, timeout_s: float) -> bool:
    """Wait for the monitor's first discovery run (the coordinator's first start should see its
    results, not an empty store). False if it did not complete in time."""
    try:
        await asyncio.wait_for(monitor.wait_scan(after=0), timeout_s)
    except TimeoutError:
        return False
    return True
