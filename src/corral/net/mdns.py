"""DNS-SD over mDNS for ggml RPC backends (python-zeroconf).

A node announces `_ggml-rpc._tcp.local.` with its backend's address and port, and TXT records
carrying what the network cannot see: protocol version, devices, node id, status, client.
Everything read back from the network is untrusted: it passes the endpoint gate and size checks,
and anything else is dropped with a warning saying which service and why.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from corral.endpoint import Endpoint, EndpointError, parse_endpoint

SERVICE_TYPE = "_ggml-rpc._tcp.local."
MAX_TXT_VALUE = 200
MAX_ADDRESSES = 16  # per service
MAX_SERVICES = 256  # per browse: a flood of announcements must not become a flood of probes
RESOLVE_MS = 1000


@dataclass(frozen=True, slots=True)
class MdnsService:
    name: str
    endpoint: Endpoint
    txt: dict[str, str]


def encode_txt(values: dict[str, str | None]) -> dict[str, str]:
    """Pure: drop empty values, cap each one's length (TXT strings are at most 255 bytes)."""
    return {k: v[:MAX_TXT_VALUE] for k, v in values.items() if v}


def decode_service(
    name: str, addresses: list[str], port: int | None, raw_txt: dict[bytes, bytes | None]
) -> tuple[list[MdnsService], list[str]]:
    """Pure: a resolved service into endpoints (one per address), with warnings for bad parts."""
    where = f"mdns service {name!r}"
    warnings: list[str] = []
    txt: dict[str, str] = {}
    for key, value in raw_txt.items():
        try:
            k = key.decode("utf-8")
            v = (value or b"").decode("utf-8")
        except UnicodeDecodeError:
            warnings.append(f"{where}: TXT entry is not UTF-8, dropped")
            continue
        if len(v) > MAX_TXT_VALUE:
            warnings.append(f"{where}: TXT {k!r} longer than {MAX_TXT_VALUE} bytes, dropped")
            continue
        txt[k] = v
    services: list[MdnsService] = []
    if port is None:
        return [], [*warnings, f"{where}: no port"]
    if not addresses:
        return [], [*warnings, f"{where}: no IPv4 address"]
    for addr in addresses[:MAX_ADDRESSES]:
        host = f"[{addr}]" if ":" in addr else addr
        try:
            ep = parse_endpoint(f"{host}:{port}", where=where)
        except EndpointError as exc:
            warnings.append(str(exc))
            continue
        services.append(MdnsService(name, ep, txt))
    return services, warnings


def txt_devices(txt: dict[str, str]) -> list[dict[str, int]]:
    """Devices announced in TXT `devices` as JSON [[index, free, total], ...]; junk gives []."""
    try:
        raw = json.loads(txt.get("devices", "[]"))
    except ValueError:
        return []
    out: list[dict[str, int]] = []
    if not isinstance(raw, list):
        return []
    for item in raw[:64]:
        if (
            isinstance(item, list)
            and len(item) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item)
        ):
            out.append({"index": item[0], "free_bytes": item[1], "total_bytes": item[2]})
    return out


class MdnsAnnouncer:
    """Registers one backend's service; `update` refreshes its TXT, `close` withdraws it."""

    def __init__(self, endpoint: Endpoint, instance: str, interface_ip: str | None) -> None:
        self.endpoint = endpoint
        self.instance = instance
        # Only the backend's own interface: never announce on networks it is not bound to.
        self._azc = AsyncZeroconf(
            interfaces=[interface_ip] if interface_ip else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        self._info: AsyncServiceInfo | None = None

    def _make_info(self, txt: dict[str, str]) -> AsyncServiceInfo:
        addr = socket.inet_aton(self.endpoint.host) if self.endpoint.is_ip else None
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.instance}.{SERVICE_TYPE}",
            addresses=[addr] if addr else None,
            port=self.endpoint.port,
            properties=txt,
            server=f"{self.instance}.local.",
        )

    async def start(self, txt: dict[str, str]) -> None:
        self._info = self._make_info(txt)
        await self._azc.async_register_service(self._info, allow_name_change=True)

    async def update(self, txt: dict[str, str]) -> None:
        if self._info is None:
            await self.start(txt)
            return
        info = self._make_info(txt)
        info.name = self._info.name  # keep a name that registration may have changed
        self._info = info
        await self._azc.async_update_service(info)

    @property
    def name(self) -> str:
        """The service name as registered (registration may have changed it to be unique)."""
        return self._info.name if self._info is not None else f"{self.instance}.{SERVICE_TYPE}"

    async def close(self) -> None:
        if self._info is not None:
            await self._azc.async_unregister_service(self._info)
        await self._azc.async_close()


async def browse(
    seconds: float, interfaces: list[str] | None = None
) -> tuple[list[MdnsService], list[str]]:
    """Browse for `seconds` and resolve every service seen."""
    azc = AsyncZeroconf(interfaces=interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
    names: set[str] = set()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    services: list[MdnsService] = []
    warnings: list[str] = []

    async def resolve(name: str) -> tuple[list[MdnsService], list[str]]:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(azc.zeroconf, RESOLVE_MS):
            return [], [f"mdns service {name!r}: did not resolve"]
        return decode_service(
            name, info.parsed_addresses(IPVersion.V4Only), info.port, info.properties
        )

    try:
        await asyncio.sleep(seconds)
        seen = sorted(names)
        if len(seen) > MAX_SERVICES:
            warnings.append(
                f"mdns: {len(seen)} services announced; only the first {MAX_SERVICES} resolved"
            )
        # At once, not one after another: each unresolvable name costs a whole RESOLVE_MS.
        for found, warn in await asyncio.gather(*(resolve(n) for n in seen[:MAX_SERVICES])):
            services.extend(found)
            warnings.extend(warn)
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return services, warnings
