"""What the dashboard needs from the rest of Corral, as small structural types.

The dashboard never imports the coordinator or the monitor: whoever builds the app passes in
objects that fit these shapes (any class with these attributes/methods will do).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from corral.endpoint import Endpoint
from corral.types import CoordinatorState, DeviceMemory

# Triggers one discovery run of the monitor (sources → probe → store) and returns when it is done.
Rescan = Callable[[], Awaitable[None]]


class CoordinatorStatusLike(Protocol):
    """A snapshot of the supervised llama-server, as the coordinator controller knows it."""

    @property
    def state(self) -> CoordinatorState: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def port(self) -> int | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def backends(self) -> Sequence[Endpoint]: ...
    @property
    def uptime_s(self) -> float | None: ...
    @property
    def restarts(self) -> int: ...
    @property
    def last_reason(self) -> str | None: ...
    @property
    def tokens_per_second(self) -> float | None: ...
    @property
    def memory(self) -> Sequence[DeviceMemory]: ...


class CoordinatorControl(Protocol):
    """The coordinator controller as the dashboard uses it."""

    async def restart(self, reason: str) -> None: ...
    def status(self) -> CoordinatorStatusLike: ...


@dataclass(frozen=True, slots=True)
class CoordinatorStatus:
    """A ready-made CoordinatorStatusLike, for controllers that want one."""

    state: CoordinatorState
    pid: int | None = None
    port: int | None = None
    model: str | None = None
    backends: tuple[Endpoint, ...] = ()
    uptime_s: float | None = None
    restarts: int = 0
    last_reason: str | None = None
    tokens_per_second: float | None = None
    memory: tuple[DeviceMemory, ...] = ()
