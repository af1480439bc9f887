"""Source `process`: the backends that running llama-server coordinators were started with
(read by corral.llama.processes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from corral.llama.processes import find_coordinators
from corral.sources.base import SourceReport
from corral.types import Sighting, SourceName


@dataclass
class ProcessSource:
    name: SourceName = field(default=SourceName.PROCESS, init=False)

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        for coord in await asyncio.to_thread(find_coordinators):
            report.warnings.extend(coord.errors)
            for ep in coord.backends:
                detail = f"llama-server pid {coord.pid} on {coord.serving}"
                report.sightings.append(Sighting(ep, self.name, detail))
        return report
