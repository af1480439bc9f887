"""Pace new on-link connects so the kernel's neighbour (ARP) table never overflows.

Every connect to a silent on-link address holds an INCOMPLETE entry for the ARP retries that the
kernel cannot reclaim; past gc_thresh3 it drops packets, the SYN to a live backend included (see
corral.sources.scan). The pacer keeps our unresolved connects below a share of the table.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from corral.net.neighbours import (
    DEFAULT_GC_THRESH3,
    NeighbourStats,
    count_failed_neighbours,
    read_neighbour_stats,
)

T = TypeVar("T")


@dataclass
class NeighbourPacer:
    """Hold new on-link connects so the kernel's neighbour table never fills (see module doc).

    Allows `budget` connects per `hold` seconds (the time an unanswered entry stays INCOMPLETE):
    `fill` of gc_thresh3 minus the entries others hold. Others' entries are re-measured every
    `refresh` seconds as the table's count minus our connects in flight and minus the FAILED
    entries of our namespace (reclaimed on demand), so a previous scan's entries free their room
    as they fail and two scanners on one machine share the table. The overflow counter is
    re-read every `interval`; when it rose, the budget shrinks and `overflowed_at` tells the
    scanner which probes may have lost their SYN.
    """

    fill: float = 0.75
    hold: float = 3.5
    interval: float = 0.05
    refresh: float = 0.5
    enabled: bool = True
    min_budget: int = 16
    # The kernel's readings, injectable so the pacing rule can be tested against given numbers.
    read_stats: Callable[[], NeighbourStats | None] = read_neighbour_stats
    count_failed: Callable[[], int] = count_failed_neighbours
    budget: int = field(default=0, init=False)
    _thresh: int = field(default=DEFAULT_GC_THRESH3, init=False)
    _shrink: float = field(default=1.0, init=False)
    _windows: list[tuple[float, float]] = field(default_factory=list, init=False)
    _starts: deque[float] = field(default_factory=deque, init=False)
    _last_read: float = field(default=0.0, init=False)
    _last_measure: float = field(default=0.0, init=False)
    _fulls: int | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    def __post_init__(self) -> None:
        stats = self.read_stats()
        now = time.monotonic()
        self._thresh = stats.gc_thresh3 if stats else DEFAULT_GC_THRESH3
        self._fulls = stats.table_fulls if stats else None
        self._measure(stats, now)
        self._last_read = now

    @property
    def rate(self) -> float:
        """New on-link addresses per second this pacer allows now."""
        return self.budget / self.hold

    async def room(self) -> float:
        """Wait for room for one more on-link connect; return its start time."""
        if not self.enabled:
            return time.monotonic()
        async with self._lock:  # one waiter at a time: no herd of wake-ups
            while True:
                now = time.monotonic()
                self.poll(now)
                self._expire(now)
                if len(self._starts) < self.budget:
                    self._starts.append(now)
                    return now
                await asyncio.sleep(
                    min(max(self._starts[0] + self.hold - now, 0.001), self.refresh)
                )

    def poll(self, now: float | None = None, force: bool = False) -> None:
        now = time.monotonic() if now is None else now
        if self._fulls is None or (not force and now - self._last_read < self.interval):
            return
        stats = self.read_stats()  # one netlink dump, a few hundred bytes
        if stats is None:
            return
        overflowed = stats.table_fulls > self._fulls
        if overflowed:
            self._windows.append((self._last_read, now))
            self._shrink = max(0.1, self._shrink * 0.7)
        self._fulls = stats.table_fulls
        self._last_read = now
        if force or overflowed or now - self._last_measure >= self.refresh:
            self._measure(stats, now)

    def overflowed_at(self, start: float) -> bool:
        """Did the table overflow around `start` (a connect's start, at least `interval` ago)?"""
        self.poll()
        slack = self.interval
        return any(lo - slack <= start <= hi + slack for lo, hi in self._windows)

    def _expire(self, now: float) -> None:
        while self._starts and self._starts[0] <= now - self.hold:
            self._starts.popleft()

    def _measure(self, stats: NeighbourStats | None, now: float) -> None:
        self._expire(now)
        others = 0
        if stats is not None:
            others = max(0, stats.entries - self.count_failed() - len(self._starts))
        room = int(self._thresh * self.fill) - others
        self.budget = max(self.min_budget, int(room * self._shrink))
        self._last_measure = now


async def staggered(
    calls: Sequence[Callable[[], Awaitable[T]]], step: float, within: float
) -> list[T]:
    """Run every call, each started `step` seconds after the one before (all of them within
    `within` seconds: the step shrinks for many), and return their results in order.

    Hundreds of probes started at once also finish at once (a refused connect on a LAN takes
    microseconds): that lump of callbacks holds the event loop for tens of milliseconds, and
    every request waiting behind it pays for it.
    """
    gap = min(step, within / max(1, len(calls)))

    async def one(i: int, call: Callable[[], Awaitable[T]]) -> T:
        if i and gap > 0:
            await asyncio.sleep(i * gap)
        return await call()

    return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(calls))))
