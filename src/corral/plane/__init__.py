"""The control plane in one process: dashboard + monitor (+ coordinator), sharing one store and
one prober. `corral dashboard`, `corral up` and `corral demo` run it."""

from corral.plane.plane import (
    CoordinatorPlan,
    Plane,
    PlaneConfig,
    PlaneError,
    WatchPlan,
    run_plane,
)

__all__ = [
    "CoordinatorPlan",
    "Plane",
    "PlaneConfig",
    "PlaneError",
    "WatchPlan",
    "run_plane",
]
