"""Source `mdns`: ggml RPC services announced on the local network (DNS-SD).

Like the registry, a node's announcement says what the network cannot see: a backend its node
reports as held by a client is handed on as `busy` with that client, not probed (a held backend
answers nobody else, and every probe left waiting fills its accept queue). What the TXT says is
untrusted: the client must pass the endpoint gate, or the backend is simply probed.

zeroconf (corral.net.mdns) is imported when the source runs, not when the chain is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.endpoint import EndpointError, parse_endpoint
from corral.sources.base import SourceReport
from corral.types import Device, ProbeResult, Sighting, SourceName, Status

if TYPE_CHECKING:
    from corral.net.mdns import MdnsService

_VERSION = re.compile(r"^[0-9]{1,5}\.[0-9]{1,5}\.[0-9]{1,5}$")


def held_result(svc: MdnsService) -> tuple[ProbeResult | None, str | None]:
    """Pure: the probe result a `busy` announcement stands for, or a warning why not."""
    from corral.net.mdns import txt_devices

    if svc.txt.get("status") != str(Status.BUSY):
        return None, None
    where = f"mdns service {svc.name!r}: TXT 'client'"
    try:
        client = parse_endpoint(svc.txt.get("client", ""), where=where)
    except EndpointError as exc:
        return None, f"{exc}; probing instead"
    devices = tuple(
        Device(d["index"], d["free_bytes"], d["total_bytes"]) for d in txt_devices(svc.txt)
    )
    return (
        ProbeResult(
            svc.endpoint,
            Status.BUSY,
            version=version if _VERSION.match(version := svc.txt.get("version", "")) else None,
            devices=devices,
            error=f"in use by {client} (announced by its node)",
        ),
        None,
    )


@dataclass
class MdnsSource:
    seconds: float = 1.5
    interfaces: list[str] | None = None
    name: SourceName = field(default=SourceName.MDNS, init=False)

    async def collect(self) -> SourceReport:
        from corral.net import mdns

        report = SourceReport(self.name)
        try:
            services, warnings = await mdns.browse(self.seconds, self.interfaces)
        except OSError as exc:
            report.warnings.append(f"mdns: cannot browse: {exc}")
            return report
        report.warnings.extend(warnings)
        for svc in services:
            report.sightings.append(Sighting(svc.endpoint, self.name, svc.name))
            held, warning = held_result(svc)
            if warning is not None:
                report.warnings.append(warning)
            if held is not None and str(svc.endpoint) not in report.probes:
                report.probes[str(svc.endpoint)] = held
        return report
