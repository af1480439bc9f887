"""Source `mdns`: ggml RPC services announced on the local network (DNS-SD)."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral import mdns
from corral.model import Sighting, SourceName
from corral.sources.base import SourceReport


@dataclass
class MdnsSource:
    seconds: float = 1.5
    interfaces: list[str] | None = None
    name: SourceName = field(default=SourceName.MDNS, init=False)

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        try:
            services, warnings = await mdns.browse(self.seconds, self.interfaces)
        except OSError as exc:
            report.warnings.append(f"mdns: cannot browse: {exc}")
            return report
        report.warnings.extend(warnings)
        for svc in services:
            report.sightings.append(Sighting(svc.endpoint, self.name, svc.name))
        return report
