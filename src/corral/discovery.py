"""The priority chain: run the sources, merge their sightings by endpoint, probe each once.

- Every backend any source saw is listed, with all its sources and its live status, so the user
  sees the whole picture (a file entry that is offline, a scan hit nobody configured).
- The set a coordinator should use comes from the first source, in priority order, that yields a
  live backend (ready or busy); a source whose entries are all dead does not hide the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from corral.endpoint import Endpoint
from corral.rpc.probe import Prober
from corral.sources.base import Source, SourceReport
from corral.types import Backend, ProbeResult, SourceName, Status

LIVE = frozenset({Status.READY, Status.BUSY})


@dataclass(slots=True)
class DiscoveryResult:
    backends: list[Backend]
    deciding_source: SourceName | None
    chosen: list[Endpoint]
    warnings: list[str] = field(default_factory=list)


def merge(reports: Sequence[SourceReport]) -> list[Backend]:
    """Pure: one Backend per endpoint, sources in report (priority) order, first seen first."""
    by_endpoint: dict[Endpoint, Backend] = {}
    for report in reports:
        for sighting in report.sightings:
            backend = by_endpoint.setdefault(sighting.endpoint, Backend(sighting.endpoint))
            if sighting.source not in backend.sources:
                backend.sources.append(sighting.source)
            probed = report.probes.get(str(sighting.endpoint))
            if probed is not None and backend.probe is None:
                backend.probe = probed
    return list(by_endpoint.values())


def choose(
    reports: Sequence[SourceReport], backends: list[Backend]
) -> tuple[SourceName | None, list[Endpoint]]:
    """Pure: the first source with a live backend decides; its live backends are the set."""
    status = {b.endpoint: (b.probe.status if b.probe else None) for b in backends}
    for report in reports:
        live = [s.endpoint for s in report.sightings if status.get(s.endpoint) in LIVE]
        if live:
            return report.source, list(dict.fromkeys(live))
    return None, []


@dataclass
class Discovery:
    sources: Sequence[Source]
    prober: Prober

    async def run(self) -> DiscoveryResult:
        reports = await asyncio.gather(*(self._collect(s) for s in self.sources))
        backends = merge(reports)
        unprobed = [b for b in backends if b.probe is None]
        results: list[ProbeResult] = await asyncio.gather(
            *(self.prober.probe(b.endpoint) for b in unprobed)
        )
        for backend, result in zip(unprobed, results, strict=True):
            backend.probe = result
        deciding, chosen = choose(reports, backends)
        # The same bad entry may be read by two sources (cache and registry): say it once.
        warnings = list(dict.fromkeys(w for r in reports for w in r.warnings))
        return DiscoveryResult(backends, deciding, chosen, warnings)

    async def _collect(self, source: Source) -> SourceReport:
        try:
            return await source.collect()
        except Exception as exc:  # one broken source must not hide the others
            report = SourceReport(source.name)
            report.warnings.append(f"source {source.name}: failed: {exc}")
            return report
