"""Source `scan`: probe every address of the local networks on the RPC ports.

Networks are the CIDRs given, else the machine's own IPv4 interface networks (loopback only when
asked). Only endpoints that accept a TCP connection are reported (or that were busy before and
whose host is still up: a busy backend's full accept queue drops new SYNs).

A large on-link scan is paced by the kernel's neighbour (ARP) table: every silent address holds an
entry while ARP gives up on it, and once the table is full the kernel drops packets — including
the SYN to a live backend. The pacer keeps the table below a safe fill, and the scan reports any
overflow the kernel counted, so a fast scan never silently misses a backend.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil

from corral.endpoint import DEFAULT_RPC_PORT, Endpoint
from corral.model import ProbeResult, Sighting, SourceName, Status
from corral.net.neighbours import read_gc_thresh3, read_neighbour_stats
from corral.rpc.probe import Prober
from corral.sources.base import SourceReport

MAX_PREFIX_WITHOUT_CONSENT = 16
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ScanError(ValueError):
    """A scan request that is refused (too large, malformed); the message says why."""


def parse_cidrs(texts: list[str], allow_large: bool) -> list[Network]:
    nets: list[Network] = []
    for text in texts:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError as exc:
            raise ScanError(f"--cidr {text!r}: {exc}") from None
        check_size(net, allow_large, f"--cidr {text}")
        nets.append(net)
    return nets


def check_size(net: Network, allow_large: bool, where: str) -> None:
    limit = MAX_PREFIX_WITHOUT_CONSENT if net.version == 4 else 112
    if net.prefixlen < limit and not allow_large:
        raise ScanError(
            f"{where}: {net} has {net.num_addresses} addresses, more than a /{limit}; "
            "pass --allow-large to scan it anyway"
        )


def interface_networks(include_loopback: bool) -> list[Network]:
    """The machine's own IPv4 networks, from its interfaces (psutil)."""
    nets: list[Network] = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name != "AF_INET" or not entry.netmask:
                continue
            iface = ipaddress.IPv4Interface(f"{entry.address}/{entry.netmask}")
            if iface.ip.is_loopback and not include_loopback:
                continue
            if iface.ip.is_link_local:
                continue
            if iface.network.prefixlen < MAX_PREFIX_WITHOUT_CONSENT:
                # Never scan a huge interface network by default: its own /16 around us.
                iface = ipaddress.IPv4Interface(f"{entry.address}/{MAX_PREFIX_WITHOUT_CONSENT}")
            if iface.network not in nets:
                nets.append(iface.network)
    return nets


def targets(nets: list[Network], ports: list[int]) -> Iterator[Endpoint]:
    seen: set[Network] = set()
    for net in nets:
        if net in seen:
            continue
        seen.add(net)
        hosts = [net.network_address] if net.num_addresses == 1 else net.hosts()
        for addr in hosts:
            for port in ports:
                yield Endpoint(addr.compressed, port)


@dataclass
class NeighbourPacer:
    """Hold new connects while the kernel's neighbour table is near full (see module doc)."""

    fill: float = 0.5
    interval: float = 0.02
    _limit: int = 0
    _entries: int = 0
    _last: float = 0.0
    enabled: bool = True

    def __post_init__(self) -> None:
        self._limit = int(read_gc_thresh3() * self.fill)
        self.enabled = self.enabled and read_neighbour_stats() is not None

    async def room(self) -> None:
        while self.enabled:
            now = time.monotonic()
            if now - self._last >= self.interval:
                stats = read_neighbour_stats()  # a /proc read of a few hundred bytes
                self._entries = stats.entries if stats else 0
                self._last = now
            if self._entries < self._limit:
                self._entries += 1  # count our own connect until the next reading
                return
            await asyncio.sleep(self.interval)


@dataclass
class ScanStats:
    addresses: int = 0
    seconds: float = 0.0
    neighbour_overflows: int = 0


@dataclass
class Scanner:
    prober: Prober
    concurrency: int = 500
    pace_neighbours: bool = True
    stats: ScanStats = field(default_factory=ScanStats)

    async def scan(self, endpoints: Iterator[Endpoint]) -> list[ProbeResult]:
        pacer = NeighbourPacer(enabled=self.pace_neighbours)
        before = read_neighbour_stats()
        start = time.monotonic()
        found: list[ProbeResult] = []
        count = 0

        async def worker(queue: Iterator[Endpoint]) -> None:
            nonlocal count
            for ep in queue:
                count += 1
                await pacer.room()
                result = await self.prober.probe(ep)
                if result.status is not Status.OFFLINE:
                    found.append(result)

        shared = iter(endpoints)  # workers pull from one iterator: no list of 65k endpoints
        await asyncio.gather(*(worker(shared) for _ in range(self.concurrency)))
        after = read_neighbour_stats()
        self.stats = ScanStats(
            addresses=count,
            seconds=time.monotonic() - start,
            neighbour_overflows=(
                (after.table_fulls - before.table_fulls) if before and after else 0
            ),
        )
        found.sort(key=lambda r: (ipaddress.ip_address(r.endpoint.host), r.endpoint.port))
        return found


@dataclass
class ScanSource:
    cidrs: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=lambda: [DEFAULT_RPC_PORT])
    timeout: float = 0.4
    include_loopback: bool = False
    allow_large: bool = False
    concurrency: int = 500
    prober: Prober | None = None
    name: SourceName = field(default=SourceName.SCAN, init=False)
    last_stats: ScanStats = field(default_factory=ScanStats, init=False)

    def networks(self) -> list[Network]:
        if self.cidrs:
            return parse_cidrs(self.cidrs, self.allow_large)
        return interface_networks(self.include_loopback)

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        nets = self.networks()
        prober = self.prober or Prober(timeout=self.timeout, host_up_means_busy=False)
        scanner = Scanner(prober, concurrency=self.concurrency)
        results = await scanner.scan(targets(nets, self.ports))
        self.last_stats = scanner.stats
        if scanner.stats.neighbour_overflows:
            report.warnings.append(
                f"scan: the kernel's neighbour table overflowed {scanner.stats.neighbour_overflows}"
                " times; some hosts may have been missed (lower --concurrency)"
            )
        for result in results:
            report.sightings.append(Sighting(result.endpoint, self.name, "scan"))
            report.probes[str(result.endpoint)] = result
        return report
