"""A clock a test moves by hand, for code that takes `clock: Callable[[], float]`.

TTLs and debounces are then asserted at their exact edges (one tick before: still there; at the
edge: gone) instead of by sleeping past them with a slack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    now: float = 1_700_000_000.0  # seconds since the epoch, like time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        assert seconds >= 0, "a clock only moves forward"
        self.now += seconds
        return self.now
