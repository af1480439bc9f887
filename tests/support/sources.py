"""A discovery source a test sets by hand: it sees exactly the endpoints it is given, now."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.endpoint import Endpoint
from corral.sources.base import SourceReport
from corral.types import Sighting, SourceName


@dataclass
class ListedSource:
    """Sees `endpoints` (change them between runs), under `name` (default: file)."""

    endpoints: list[Endpoint] = field(default_factory=list)
    name: SourceName = SourceName.FILE

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        for ep in self.endpoints:
            report.sightings.append(Sighting(ep, self.name, "listed by the test"))
        return report
