"""Is llama-server's model load still moving? Pure: samples in, judgement and progress out.

A load over RPC may take minutes (every tensor crosses the network), so a start is never
given a fixed time: it fails only when nothing has moved for `stall_s`. What counts as moving,
each measured on llama-server's own process (load_reader.py reads them):
- bytes its TCP connections to its backends sent or received (the tensors, then the replies);
- its log growing (each loading phase logs);
- `rchar`/`wchar` (a model read with read(2), e.g. --no-mmap) and its resident memory (a local
  load of an mmapped model), past a noise floor: answering our own /health polls moves them a
  little, and that must not pass for progress.

Percent is bytes sent over bytes to send: the model file's size is an upper bound (the token
embeddings stay local), so it may end short of 100 %.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

READ_NOISE = 64 * 1024  # rchar/wchar moved by less than this since the last progress: noise
RSS_NOISE = 1024 * 1024
RATE_WINDOW_S = 5.0  # the rate is measured over this much of the most recent loading
_HISTORY = 256  # samples kept for the rate, at most


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One look at a loading llama-server, at `at` on the runner's clock. None: unreadable."""

    at: float
    sent: int | None = None  # bytes acked on its connections to its backends
    received: int | None = None
    rchar: int | None = None
    wchar: int | None = None
    rss: int | None = None
    log_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """What the load has done, for people and the coordinator record."""

    done_bytes: int
    total_bytes: int | None
    rate_bps: float | None
    eta_s: float | None
    verb: str = "sent"  # "sent" to backends, or "read" for a load on this machine only

    @property
    def percent(self) -> float | None:
        if not self.total_bytes:
            return None
        return min(100.0, 100.0 * self.done_bytes / self.total_bytes)

    def text(self) -> str:
        """ "loading model: 45% (1.2 of 2.6 GB sent, 110 MB/s, 13 s left)"."""
        parts = [
            f"{_size(self.done_bytes, self.total_bytes)} {self.verb}"
            if self.total_bytes
            else f"{_size(self.done_bytes)} {self.verb}"
        ]
        if self.rate_bps is not None:
            parts.append(f"{_size(round(self.rate_bps))}/s")
        if self.eta_s is not None:
            parts.append(f"{_duration(self.eta_s)} left")
        percent = self.percent
        if percent is None:
            return "loading model: " + ", ".join(parts)
        # Floored: "100%" only when all is done, not at 99.6.
        return f"loading model: {math.floor(percent)}% ({', '.join(parts)})"


def moved(base: LoadSample, now: LoadSample) -> bool:
    """Did anything move from `base` (the last sample that showed progress) to `now`?"""

    def grew(a: int | None, b: int | None, floor: int = 1) -> bool:
        return a is not None and b is not None and b - a >= floor

    return (
        grew(base.sent, now.sent)
        or grew(base.received, now.received)
        or grew(base.log_bytes, now.log_bytes)
        or grew(base.rchar, now.rchar, READ_NOISE)
        or grew(base.wchar, now.wchar, READ_NOISE)
        or (base.rss is not None and now.rss is not None and abs(now.rss - base.rss) >= RSS_NOISE)
    )


@dataclass
class LoadWatch:
    """One load, from llama-server's start to ready (or failure). Fed samples; no I/O, and its
    only clock is the samples' `at`."""

    stall_s: float
    started_at: float
    total_bytes: int | None = None
    remote: bool = True  # loading to RPC backends: done = bytes sent; else bytes read/resident
    progress_at: float = field(init=False)  # when something last moved
    seen_at: float = field(init=False)  # when the last sample was taken
    _base: LoadSample | None = field(default=None, init=False)
    _last: LoadSample | None = field(default=None, init=False)
    _history: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=_HISTORY), init=False
    )

    def __post_init__(self) -> None:
        self.progress_at = self.seen_at = self.started_at

    def feed(self, sample: LoadSample) -> None:
        self.seen_at = sample.at
        if self._base is None or moved(self._base, sample):
            if self._base is not None:
                self.progress_at = sample.at
            self._base = sample
        self._last = sample
        self._history.append((sample.at, self._done(sample)))
        while self._history and sample.at - self._history[0][0] > RATE_WINDOW_S:
            self._history.popleft()

    def stalled(self) -> str | None:
        """Why the load counts as stuck (no progress for `stall_s` by the last sample), or None.

        The first sample is the baseline: a llama-server that never moves at all stalls too."""
        quiet = self.seen_at - self.progress_at
        if quiet < self.stall_s:
            return None
        return f"made no loading progress for {self.stall_s:g} s ({self.progress().text()})"

    def progress(self) -> LoadProgress:
        done = self._done(self._last) if self._last else 0
        rate = None
        if len(self._history) >= 2:
            (t0, d0), (t1, d1) = self._history[0], self._history[-1]
            if t1 > t0:
                rate = max(0.0, (d1 - d0) / (t1 - t0))
        total = self.total_bytes
        eta = None
        if rate and total and done < total:
            eta = (total - done) / rate
        return LoadProgress(done, total, rate, eta, "sent" if self.remote else "read")

    def _done(self, s: LoadSample) -> int:
        # A local load reads the file (rchar) or maps it (resident): the larger counts.
        done = (s.sent or 0) if self.remote else max(s.rchar or 0, s.rss or 0)
        return min(done, self.total_bytes) if self.total_bytes else done


@dataclass
class ProgressLines:
    """When a person watching gets a new progress line: every `step` percent, or every `every_s`
    seconds when the percent is unknown or creeping. Pure; the caller's clock."""

    step: float = 10.0
    every_s: float = 5.0
    _at: float | None = field(default=None, init=False)
    _percent: float | None = field(default=None, init=False)

    def due(self, now: float, percent: float | None) -> bool:
        crossed = (
            percent is not None
            and self._percent is not None
            and percent >= self._percent + self.step
        )
        if self._at is not None and now - self._at < self.every_s and not crossed:
            return False
        self._at = now
        self._percent = None if percent is None else percent - percent % self.step
        return True


def _size(n: int, of: int | None = None) -> str:
    """Decimal units, like disks and links: "1.2 GB", "1.2 of 2.6 GB", "110 MB"."""
    scale = max(n, of or 0)
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if scale >= factor:
            digits = 1 if scale < 100 * factor else 0
            one = f"{n / factor:.{digits}f}"
            return f"{one} of {of / factor:.{digits}f} {unit}" if of else f"{one} {unit}"
    return f"{n} of {of} B" if of else f"{n} B"


def _duration(s: float) -> str:
    if s < 100:
        return f"{s:.0f} s"
    if s < 6000:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
