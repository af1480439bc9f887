"""The last hour on the page: a bounded, in-memory history of what the dashboard sees.

Fed on every LiveView refresh (each store change, and every `refresh_s` anyway). Samples —
tokens/s, requests forwarded through /v1 in the step, each backend's probe latency — are taken
at most once a `step_s`, on the first refresh that finds one due, so every series holds at most
`window_s / step_s` points and none older than the window. Statuses are kept as changes, not
samples: (since, status) per backend, at most `max_changes` each, intervals that ended before
the window dropped. At most `max_backends` backends are tracked (the rest are counted, not
kept); one the store no longer has leaves once nothing of it is left in the window.

Pure: every call is given the time (the app's clock; tests pass a FakeClock).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.web.schemas import is_serving

DEFAULT_STEP_S = 10.0
DEFAULT_WINDOW_S = 3600.0
# Charted lines on one page: far more would be unreadable, and each costs window/step points.
DEFAULT_MAX_BACKENDS = 256
DEFAULT_MAX_CHANGES = 512  # a backend flapping every 7 s for an hour


@dataclass(frozen=True, slots=True)
class Seen:
    """One backend as one refresh saw it: the status the page shows, the last probe's latency."""

    status: str
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    tokens_per_second: float | None
    requests_total: int  # forwarded through /v1 since the app started
    backends: Mapping[str, Seen]  # by endpoint, in the order the page lists them


def observation(
    now: float,
    items: Iterable[Mapping[str, Any]],
    coordinator: Mapping[str, Any],
    requests_total: int,
) -> Observation:
    """Pure: an Observation from `/api/rpc_backends` items and the `/api/coordinator` object; a
    backend our coordinator holds shows as `serving`, as on the page (schemas.is_serving)."""
    backends = {}
    for item in items:
        host = f"[{item['host']}]" if ":" in item["host"] else item["host"]
        status = "serving" if is_serving(item) else str(item["status"])
        backends[f"{host}:{item['port']}"] = Seen(status, item["latency_ms"])
    return Observation(now, coordinator["tokens_per_second"], requests_total, backends)


@dataclass
class _Track:
    """One backend: its latency samples (aligned with History.times) and its status changes."""

    latency: deque[float | None]
    changes: deque[tuple[float, str | None]]  # (since, status); None: not in the store

    @property
    def status(self) -> str | None:
        return self.changes[-1][1] if self.changes else None


@dataclass
class History:
    step_s: float = DEFAULT_STEP_S
    window_s: float = DEFAULT_WINDOW_S
    max_backends: int = DEFAULT_MAX_BACKENDS
    max_changes: int = DEFAULT_MAX_CHANGES
    times: deque[float] = field(init=False)
    tokens_per_second: deque[float | None] = field(init=False)
    requests: deque[int | None] = field(init=False)
    untracked: int = field(default=0, init=False)  # backends seen at the last look, not kept
    now: float | None = field(default=None, init=False)  # the last observation's time
    version: int = field(default=0, init=False)  # moves whenever what to_json says changes
    _tracks: dict[str, _Track] = field(default_factory=dict, init=False)
    _requests_total: int | None = field(default=None, init=False)
    _body: tuple[int, bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not (self.step_s > 0 and self.window_s >= self.step_s):
            raise ValueError(
                f"history: step {self.step_s:g} s must be above 0 and at most the window"
                f" ({self.window_s:g} s)"
            )
        if self.max_backends < 1 or self.max_changes < 2:
            raise ValueError("history: max_backends must be at least 1, max_changes at least 2")
        self.times = deque(maxlen=self.capacity)
        self.tokens_per_second = deque(maxlen=self.capacity)
        self.requests = deque(maxlen=self.capacity)

    @property
    def capacity(self) -> int:
        """Points per series: one window's worth of steps."""
        return max(2, math.ceil(self.window_s / self.step_s))

    @property
    def tracked(self) -> list[str]:
        return list(self._tracks)

    def observe(self, obs: Observation) -> None:
        if self.now is not None and obs.now < self.now:
            self._clear()  # the wall clock went back: a chart's time axis must not
        self.now = obs.now
        changed = self._statuses(obs)
        if not self.times or obs.now >= self.times[-1] + self.step_s:
            self._sample(obs)
            changed = True
        changed = self._prune(obs.now) or changed
        if changed:
            self.version += 1

    def _clear(self) -> None:
        for series in (self.times, self.tokens_per_second, self.requests):
            series.clear()
        self._tracks.clear()
        self._requests_total = None

    def _statuses(self, obs: Observation) -> bool:
        changed = False
        untracked = 0
        for endpoint, seen in obs.backends.items():
            track = self._tracks.get(endpoint)
            if track is None:
                if len(self._tracks) >= self.max_backends:
                    untracked += 1
                    continue
                track = _Track(
                    deque([None] * len(self.times), maxlen=self.capacity),
                    deque(maxlen=self.max_changes),
                )
                self._tracks[endpoint] = track
            if track.status != seen.status:
                track.changes.append((obs.now, seen.status))
                changed = True
        for endpoint, track in self._tracks.items():
            if endpoint not in obs.backends and track.status is not None:
                track.changes.append((obs.now, None))
                changed = True
        self.untracked = untracked
        return changed

    def _sample(self, obs: Observation) -> None:
        total = obs.requests_total
        before = self._requests_total
        # The first sample cannot say how many came before it; a counter that fell restarted.
        step_requests = None if before is None else (total - before if total >= before else total)
        self._requests_total = total
        self.times.append(obs.now)
        self.tokens_per_second.append(obs.tokens_per_second)
        self.requests.append(step_requests)
        for endpoint, track in self._tracks.items():
            seen = obs.backends.get(endpoint)
            track.latency.append(seen.latency_ms if seen is not None else None)

    def _prune(self, now: float) -> bool:
        """Drop what ended before the window; True when something went."""
        cutoff = now - self.window_s
        dropped = False
        while self.times and self.times[0] < cutoff:
            self.times.popleft()
            self.tokens_per_second.popleft()
            self.requests.popleft()
            for track in self._tracks.values():
                track.latency.popleft()
            dropped = True
        for endpoint in list(self._tracks):
            changes = self._tracks[endpoint].changes
            while len(changes) >= 2 and changes[1][0] <= cutoff:
                changes.popleft()
                dropped = True
            if len(changes) == 1 and changes[0][1] is None and changes[0][0] <= cutoff:
                del self._tracks[endpoint]  # gone from the store for the whole window
                dropped = True
        return dropped

    # ---- what GET /api/history answers -------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        now = self.now
        start = None if now is None else now - self.window_s
        return {
            "step_s": self.step_s,
            "window_s": self.window_s,
            "now": now,
            "times": list(self.times),
            "tokens_per_second": list(self.tokens_per_second),
            "requests": list(self.requests),
            "backends": [
                {
                    "endpoint": endpoint,
                    "latency_ms": list(track.latency),
                    "timeline": timeline(track.changes, start),
                }
                for endpoint, track in self._tracks.items()
            ],
            "untracked": self.untracked,
        }

    def body(self, encode: Callable[[Any], bytes]) -> bytes:
        """`to_json()` encoded, kept until the history changes (the page polls it)."""
        if self._body is None or self._body[0] != self.version:
            self._body = (self.version, encode(self.to_json()))
        return self._body[1]


def timeline(
    changes: Iterable[tuple[float, str | None]], start: float | None
) -> list[dict[str, Any]]:
    """Pure: the intervals between changes, `to` None for the one still going; time out of the
    store is no interval; a start before the window is shown at the window's start."""
    items = list(changes)
    out = []
    for i, (since, status) in enumerate(items):
        if status is None:
            continue
        until = items[i + 1][0] if i + 1 < len(items) else None
        begin = since if start is None else max(since, start)
        out.append({"status": status, "from": begin, "to": until})
    return out
