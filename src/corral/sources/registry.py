"""Source `registry`: backends whose node agents heartbeat into the store.

A node knows what the network cannot: a backend held by a coordinator is `busy` with that
client's address (not `offline`), so the registration's status is handed on as the probe result
for held backends. Free backends are probed fresh by the discovery like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.endpoint import EndpointError, parse_endpoint
from corral.sources.base import SourceReport
from corral.store.base import Store
from corral.types import ProbeResult, Sighting, SourceName, Status


@dataclass
class RegistrySource:
    store: Store
    name: SourceName = field(default=SourceName.REGISTRY, init=False)

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        nodes = await self.store.live_nodes()
        report.warnings.extend(self.store.take_warnings())
        for reg in nodes:
            report.sightings.append(
                Sighting(reg.endpoint, self.name, f"node {reg.node_id} on {reg.hostname}")
            )
            if reg.status is not Status.BUSY or not reg.client:
                continue
            try:
                client = parse_endpoint(
                    reg.client, where=f"registry node {reg.node_id}: field 'client'"
                )
            except EndpointError as exc:
                report.warnings.append(f"{exc}; probing instead")
                continue
            report.probes[str(reg.endpoint)] = ProbeResult(
                reg.endpoint,
                Status.BUSY,
                version=reg.version,
                devices=reg.devices,
                error=f"in use by {client} (reported by its node)",
            )
        return report
