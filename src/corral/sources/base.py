"""The one small interface every discovery source implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from corral.types import ProbeResult, Sighting, SourceName


@dataclass(slots=True)
class SourceReport:
    """What one source saw. `warnings` say what was dropped, where and why."""

    source: SourceName
    sightings: list[Sighting] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Sources that already spoke to the endpoint (the scan) hand their results on, so the
    # discovery does not probe the same backend twice.
    probes: dict[str, ProbeResult] = field(default_factory=dict)


class Source(Protocol):
    name: SourceName

    async def collect(self) -> SourceReport: ...
