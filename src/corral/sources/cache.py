"""Source `cache`: the last known backends from the store — the last resort of the chain.

For people moving from the older design, also the `rpc_backends` list in the Redis key
`sollol:router:metadata` (a Redis-backed store reads it; the embedded one has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.endpoint import Endpoint
from corral.sources.base import SourceReport
from corral.store.base import Store
from corral.types import Sighting, SourceName


@dataclass
class CacheSource:
    store: Store
    name: SourceName = field(default=SourceName.CACHE, init=False)

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        seen: set[Endpoint] = set()
        for record in await self.store.backends():
            seen.add(record.endpoint)
            report.sightings.append(Sighting(record.endpoint, self.name, "last known view"))
        for ep in await self.store.legacy_backends():
            if ep not in seen:
                seen.add(ep)
                report.sightings.append(Sighting(ep, self.name, "sollol:router:metadata"))
        report.warnings.extend(self.store.take_warnings())
        return report
