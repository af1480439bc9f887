"""Source `scan`: probe every address of the local networks on the RPC ports.

Networks are the CIDRs given, else the machine's own IPv4 interface networks (loopback only when
asked). Only endpoints that accept a TCP connection are reported (or that were busy before and
whose host is still up: a busy backend's full accept queue drops new SYNs).

A large on-link scan is bounded by the kernel's neighbour (ARP) table, one table of gc_thresh3
entries (1024 by default) shared by every network namespace. Every connect to a silent on-link
address holds an INCOMPLETE entry for the ARP retries (3 s by default) that the kernel cannot
reclaim; once the table is full it drops packets, including the SYN to a live backend. So TCP
connects alone reach at most about gc_thresh3 / 3 s new on-link addresses per second, whatever
the concurrency: a /16 takes minutes. Two ways through, in this order:

- ARP sweep (needs CAP_NET_RAW): for an on-link network larger than `sweep_above` addresses, ask
  every address over ARP with raw frames, which leave no kernel entries, and TCP-probe only the
  hosts that answered (and our own addresses). A host that does not answer ARP cannot accept a
  TCP connection on that link either, so nothing live is skipped. A /16 takes about 17 s.
- Paced TCP (no CAP_NET_RAW, or small networks): the pacer keeps our unresolved on-link connects
  below a share of the table, any overflow the kernel still counts shrinks the pace and sends the
  probes it may have hurt round again, and the report warns about it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import psutil

from corral.endpoint import DEFAULT_RPC_PORT, Endpoint
from corral.net.neighbours import (
    Link,
    NeighbourStats,
    arp_links,
    arp_sweep,
    count_failed_neighbours,
    host_is_up,
    incomplete_lifetime,
    local_addresses,
    read_neighbour_stats,
)
from corral.net.pacing import NeighbourPacer
from corral.rpc.probe import Prober
from corral.sources.base import SourceReport
from corral.types import ProbeResult, Sighting, SourceName, Status

MAX_PREFIX_WITHOUT_CONSENT = 16
# On-link networks with more addresses than this are ARP-swept first (when allowed): up to a /23
# a direct TCP scan fits in the neighbour table's budget and is faster than sweep + probe.
SWEEP_ABOVE = 512
ARP_RATE = 8000.0  # ARP requests per second: a /16 in about 8 s per pass
RETRY_ROUNDS = 2
CONNECT_TIMED_OUT = "no TCP connection within"  # the prober's words for a silent connect
MAX_SILENT_CHECKED = 1024  # timed-out endpoints checked for an up host, per scan
MAX_SILENT_SHOWN = 5  # rounds for probes that a neighbour-table overflow may have hurt
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


def targets(
    nets: list[Network], ports: list[int], skip: Sequence[ipaddress.IPv4Network] = ()
) -> Iterator[Endpoint]:
    """Every host address of `nets` on every port, lazily; addresses inside `skip` left out."""
    seen: set[Network] = set()
    ranges = [(int(s.network_address), int(s.broadcast_address)) for s in skip]
    for net in nets:
        if net in seen:
            continue
        seen.add(net)
        hosts = [net.network_address] if net.num_addresses == 1 else net.hosts()
        for addr in hosts:
            if ranges and addr.version == 4 and any(lo <= int(addr) <= hi for lo, hi in ranges):
                continue
            for port in ports:
                yield Endpoint(addr.compressed, port)


@dataclass(frozen=True, slots=True)
class ScanPlan:
    """Which on-link parts get an ARP sweep first, and which networks are probed by TCP."""

    sweeps: list[tuple[Link, ipaddress.IPv4Network]]
    direct: list[Network]  # probed address by address, minus the swept parts

    @property
    def swept(self) -> list[ipaddress.IPv4Network]:
        return [part for _, part in self.sweeps]


def plan_scan(nets: Sequence[Network], links: Sequence[Link], sweep_above: int | None) -> ScanPlan:
    """Pure: sweep each on-link part with more than `sweep_above` addresses (None: no sweeps).

    A network inside a link's network is swept whole; a link network inside a larger requested
    network is swept and the rest of that network is probed directly.
    """
    sweeps: list[tuple[Link, ipaddress.IPv4Network]] = []
    direct: list[Network] = []
    by_network: dict[ipaddress.IPv4Network, Link] = {}
    for link in links:
        by_network.setdefault(link.network, link)
    for net in dict.fromkeys(nets):
        covered = False
        if sweep_above is not None and isinstance(net, ipaddress.IPv4Network):
            for link_net, link in by_network.items():
                if net.subnet_of(link_net):
                    part = net
                elif link_net.subnet_of(net):
                    part = link_net
                else:
                    continue
                if part.num_addresses <= sweep_above or part in [p for _, p in sweeps]:
                    continue
                sweeps.append((link, part))
                covered = covered or part == net
        if not covered:
            direct.append(net)
    return ScanPlan(sweeps, direct)


@dataclass
class ScanStats:
    addresses: int = 0  # endpoints probed over TCP
    seconds: float = 0.0
    neighbour_overflows: int = 0  # table_fulls the kernel counted during the scan (global)
    swept: int = 0  # host addresses covered by an ARP sweep instead of one TCP connect each
    arp_up: int = 0  # swept addresses that answered ARP
    sweep_seconds: float = 0.0
    retried: int = 0  # probes sent round again after an overflow
    paced_rate: float = 0.0  # new on-link addresses per second the pacer allowed at the end


@dataclass
class Scanner:
    """Probes many endpoints at once (`concurrency` in flight) and keeps the kernel's neighbour
    table from overflowing; `scan_networks` adds the ARP sweep of large on-link networks."""

    prober: Prober
    concurrency: int = 500
    pace_neighbours: bool = True
    arp_sweep: bool = True
    sweep_above: int = SWEEP_ABOVE
    arp_rate: float = ARP_RATE
    retry_rounds: int = RETRY_ROUNDS
    stats: ScanStats = field(default_factory=ScanStats)
    warnings: list[str] = field(default_factory=list)

    async def scan_networks(self, nets: list[Network], ports: list[int]) -> list[ProbeResult]:
        """Scan whole networks: ARP-sweep the large on-link parts, probe the rest directly."""
        start = time.monotonic()
        links = await asyncio.to_thread(arp_links)
        plan = plan_scan(nets, links, self.sweep_above if self.arp_sweep else None)
        hosts: list[str] = []
        swept: list[ipaddress.IPv4Network] = []
        swept_count = arp_up = 0
        own = await asyncio.to_thread(local_addresses)
        for link, part in plan.sweeps:
            try:
                result = await asyncio.to_thread(arp_sweep, link, part, self.arp_rate)
            except OSError as exc:  # PermissionError without CAP_NET_RAW
                self.warnings.append(
                    f"scan: no ARP sweep of {part} ({exc.strerror or exc}); probing each address"
                    f" over TCP instead, paced by the kernel's neighbour table: about "
                    f"{part.num_addresses / _tcp_rate(links):.0f} s (run as root to sweep)"
                )
                if part not in plan.direct:
                    plan.direct.append(part)
                continue
            swept.append(part)
            swept_count += part.num_addresses - (2 if part.prefixlen < 31 else 0)
            arp_up += len(result.up)
            hosts += [a.compressed for a in result.up]
            hosts += [a for a in sorted(own) if _inside(a, part) and a not in hosts]
        sweep_seconds = time.monotonic() - start
        endpoints = itertools.chain(
            (Endpoint(h, p) for h in hosts for p in ports),
            targets(plan.direct, ports, skip=swept),
        )
        found = await self.scan(endpoints, links)
        self.stats.swept, self.stats.arp_up = swept_count, arp_up
        self.stats.sweep_seconds = sweep_seconds
        self.stats.seconds = time.monotonic() - start
        return found

    async def scan(
        self, endpoints: Iterable[Endpoint], links: Sequence[Link] | None = None
    ) -> list[ProbeResult]:
        """Probe each endpoint (pacing the on-link ones); return every one that is not offline."""
        if links is None:
            links = await asyncio.to_thread(arp_links)
        on_link = [(int(n.network_address), int(n.broadcast_address)) for n in _link_nets(links)]
        pacer = NeighbourPacer(
            hold=_hold(links),
            enabled=self.pace_neighbours and bool(on_link),
            read_stats=read_neighbour_stats,
            count_failed=count_failed_neighbours,
        )
        before = read_neighbour_stats()
        start = time.monotonic()
        found: list[ProbeResult] = []
        retry: list[Endpoint] = []
        timed_out: list[Endpoint] = []
        count = 0

        def paced(ep: Endpoint) -> bool:
            try:
                ip = int(ipaddress.IPv4Address(ep.host))
            except ValueError:
                return False
            return any(lo <= ip <= hi for lo, hi in on_link)

        async def worker(queue: Iterator[Endpoint]) -> None:
            nonlocal count
            for ep in queue:
                count += 1
                began = await pacer.room() if paced(ep) else None
                result = await self.prober.probe(ep)
                if result.status is not Status.OFFLINE:
                    found.append(result)
                elif began is not None and pacer.overflowed_at(began):
                    retry.append(ep)
                elif (result.error or "").startswith(CONNECT_TIMED_OUT):
                    timed_out.append(ep)

        async def run(endpoints: Iterable[Endpoint]) -> None:
            shared = iter(endpoints)  # workers pull from one iterator: no list of 65k endpoints
            await asyncio.gather(*(worker(shared) for _ in range(self.concurrency)))

        await run(endpoints)
        retried = 0
        for _ in range(self.retry_rounds):
            if not retry:
                break
            todo, retry = retry, []
            retried += len(todo)
            await run(todo)
        pacer.poll(force=True)
        self.stats = ScanStats(
            addresses=count,
            seconds=time.monotonic() - start,
            neighbour_overflows=_overflows(before, read_neighbour_stats()),
            retried=retried,
            paced_rate=pacer.rate if pacer.enabled else 0.0,
        )
        await self._say_silent_up_hosts(timed_out)
        found.sort(key=_order)
        return found

    async def _say_silent_up_hosts(self, timed_out: list[Endpoint]) -> None:
        """A host that is up but accepted no connection: a backend held by a client, its accept
        queue full, looks exactly like this (so does a firewall that drops). Say so, briefly."""
        checked = timed_out[:MAX_SILENT_CHECKED]
        up = await asyncio.to_thread(lambda: [ep for ep in checked if host_is_up(ep.host)])
        if not up:
            return
        shown = ", ".join(str(ep) for ep in up[:MAX_SILENT_SHOWN])
        more = f" and {len(up) - MAX_SILENT_SHOWN} more" if len(up) > MAX_SILENT_SHOWN else ""
        self.warnings.append(
            f"scan: {shown}{more}: the host is up but accepted no connection within "
            f"{self.prober.timeout:g} s; a backend held by a client (its accept queue full) looks "
            "like this, as does a firewall that drops; `corral probe` it to tell"
        )


def _order(result: ProbeResult) -> tuple[int, int, int]:
    addr = ipaddress.ip_address(result.endpoint.host)  # scans only ever hold IP literals
    return (addr.version, int(addr), result.endpoint.port)


def _overflows(before: NeighbourStats | None, after: NeighbourStats | None) -> int:
    return (after.table_fulls - before.table_fulls) if before and after else 0


def _link_nets(links: Sequence[Link]) -> list[ipaddress.IPv4Network]:
    return list(dict.fromkeys(link.network for link in links))


def _hold(links: Sequence[Link]) -> float:
    """How long our unanswered on-link entries stay INCOMPLETE, plus a margin."""
    lifetimes = [incomplete_lifetime(i) for i in dict.fromkeys(link.interface for link in links)]
    return max(lifetimes, default=3.0) + 0.5


def _tcp_rate(links: Sequence[Link]) -> float:
    return NeighbourPacer(hold=_hold(links)).rate


def _inside(address: str, net: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_address(address) in net
    except ValueError:
        return False


@dataclass
class ScanSource:
    cidrs: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=lambda: [DEFAULT_RPC_PORT])
    timeout: float = 0.4
    include_loopback: bool = False
    allow_large: bool = False
    concurrency: int = 500
    # Kept across collect() calls: it remembers which endpoints were busy (see rpc/probe.py).
    prober: Prober | None = None
    arp_sweep: bool = True
    sweep_above: int = SWEEP_ABOVE
    arp_rate: float = ARP_RATE
    name: SourceName = field(default=SourceName.SCAN, init=False)
    last_stats: ScanStats = field(default_factory=ScanStats, init=False)

    def networks(self) -> list[Network]:
        if self.cidrs:
            return parse_cidrs(self.cidrs, self.allow_large)
        return interface_networks(self.include_loopback)

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        nets = self.networks()
        if self.prober is None:
            self.prober = Prober(timeout=self.timeout, host_up_means_busy=False)
        scanner = Scanner(
            self.prober,
            concurrency=self.concurrency,
            arp_sweep=self.arp_sweep,
            sweep_above=self.sweep_above,
            arp_rate=self.arp_rate,
        )
        results = await scanner.scan_networks(nets, self.ports)
        self.last_stats = scanner.stats
        report.warnings += scanner.warnings
        if scanner.stats.neighbour_overflows:
            report.warnings.append(
                f"scan: the kernel's neighbour table overflowed {scanner.stats.neighbour_overflows}"
                f" times during the scan ({scanner.stats.retried} probes sent again); a host may"
                " have been missed (lower --concurrency, or run as root for an ARP sweep)"
            )
        for result in results:
            report.sightings.append(Sighting(result.endpoint, self.name, "scan"))
            report.probes[str(result.endpoint)] = result
        return report
