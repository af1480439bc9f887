"""The priority chain: run the sources, merge their sightings by backend, probe each once.

- Two names of one backend (a host name and its address, say) are one backend: the address
  each reaches decides (net.identity), so nothing probes or uses one rpc-server twice.

- Every backend any source saw is listed, with all its sources and its live status, so the user
  sees the whole picture (a file entry that is offline, a scan hit nobody configured).
- The set a coordinator should use comes from the first source, in priority order, that yields a
  live backend (ready or busy); a source whose entries are all dead does not hide the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from corral.endpoint import Endpoint
from corral.net.identity import identities
from corral.net.pacing import staggered
from corral.rpc.probe import Prober
from corral.sources.base import Source, SourceReport
from corral.types import Backend, ProbeResult, SourceName, Status

LIVE = frozenset({Status.READY, Status.BUSY})
STAGGER_WITHIN_S = 1.0  # however many there are, the last probe starts within this


@dataclass(slots=True)
class DiscoveryResult:
    backends: list[Backend]
    deciding_source: SourceName | None
    chosen: list[Endpoint]
    warnings: list[str] = field(default_factory=list)


def merge(
    reports: Sequence[SourceReport], identity: Mapping[Endpoint, Endpoint] | None = None
) -> list[Backend]:
    """Pure: one Backend per backend, sources in report (priority) order, first seen first.

    `identity` maps each endpoint to the address it reaches (net.identity): endpoints that reach
    one address are one backend, shown under the name seen first, its other names listed."""
    same = identity or {}
    by_key: dict[Endpoint, Backend] = {}
    for report in reports:
        for sighting in report.sightings:
            ep = sighting.endpoint
            backend = by_key.setdefault(same.get(ep, ep), Backend(ep))
            if ep != backend.endpoint and ep not in backend.names:
                backend.names.append(ep)
            if sighting.source not in backend.sources:
                backend.sources.append(sighting.source)
            probed = report.probes.get(str(ep))
            if probed is not None and backend.probe is None:
                backend.probe = replace(probed, endpoint=backend.endpoint)
    return list(by_key.values())


def choose(
    reports: Sequence[SourceReport],
    backends: list[Backend],
    identity: Mapping[Endpoint, Endpoint] | None = None,
) -> tuple[SourceName | None, list[Endpoint]]:
    """Pure: the first source with a live backend decides; its live backends are the set, each
    once, under the name it is listed by."""
    same = identity or {}
    listed = {same.get(b.endpoint, b.endpoint): b for b in backends}
    for report in reports:
        named = [listed.get(same.get(s.endpoint, s.endpoint)) for s in report.sightings]
        live = [b.endpoint for b in named if b is not None and _live(b)]
        if live:
            return report.source, list(dict.fromkeys(live))
    return None, []


def _live(backend: Backend) -> bool:
    return backend.probe is not None and backend.probe.status in LIVE


@dataclass
class Discovery:
    sources: Sequence[Source]
    prober: Prober
    # Between the starts of its probes: 0 for a one-off command (it waits for all of them),
    # a little for a long-running monitor that shares its event loop with the API.
    stagger_s: float = 0.0

    async def run(self) -> DiscoveryResult:
        reports = await asyncio.gather(*(self._collect(s) for s in self.sources))
        identity = await identities(s.endpoint for r in reports for s in r.sightings)
        backends = merge(reports, identity)
        unprobed = [b for b in backends if b.probe is None]
        results: list[ProbeResult] = await staggered(
            [partial(self.prober.probe, b.endpoint) for b in unprobed],
            self.stagger_s,
            STAGGER_WITHIN_S,
        )
        for backend, result in zip(unprobed, results, strict=True):
            backend.probe = result
        deciding, chosen = choose(reports, backends, identity)
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
