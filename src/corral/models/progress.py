"""A download's progress in words: "fetching owner/repo m.gguf: 45% (1.2 of 2.6 GB, 50 MB/s,
20 s left)". Pure: the caller hands in the time, so a test can hand in its own."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 5.0  # speed over the last few seconds: the rate now, not since the start
MAX_SAMPLES = 256


@dataclass
class Speed:
    """Bytes a second over the last WINDOW_S, from (time, bytes done) samples."""

    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))

    def add(self, now: float, done: int) -> None:
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # started over (a server that ignored a resume): a new count
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= WINDOW_S:
            self.samples.popleft()

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


def describe(what: str, done: int, total: int | None, rate: float | None) -> str:
    """One line for the page and the log."""
    extra = []
    if rate is not None:
        extra.append(f"{size(rate)}/s")
        if total and rate > 0 and done < total:
            extra.append(f"{duration((total - done) / rate)} left")
    if total:
        amount = f"{size(done, total)} of {size(total)}"
        head = f"fetching {what}: {min(100, int(done * 100 / total))}%"
    else:
        amount, head = size(done), f"fetching {what}"
    return f"{head} ({', '.join([amount, *extra])})"


_UNITS = ("B", "kB", "MB", "GB", "TB")


def size(n: float, scale_of: float | None = None) -> str:
    """Decimal units, as download sizes are given: 1.2 GB. `scale_of` picks the unit of another
    number (so "1.2 of 2.6 GB" reads in one unit)."""
    ref = max(abs(scale_of if scale_of is not None else n), 1)
    unit = 0
    while ref >= 1000 and unit < len(_UNITS) - 1:
        ref, n, unit = ref / 1000, n / 1000, unit + 1
    if unit == 0:
        return f"{int(n)} B" if scale_of is None else f"{int(n)}"
    shown = f"{n:.1f}" if n < 100 else f"{n:.0f}"
    return shown if scale_of is not None else f"{shown} {_UNITS[unit]}"


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s < 600 else f"{round(s / 60)} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
