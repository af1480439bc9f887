"""What the kernel knows about hosts on the local link: pure parsers plus small readers.

Used for two things the TCP handshake alone cannot tell:
- a connect that timed out to a host that *is* up (the neighbour entry is complete, or the address
  is our own) is a backend whose accept queue is full, not a dead host (see the facts file);
- a large on-link scan must not overflow the neighbour table, or SYNs to live hosts are dropped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import psutil

ARP_TABLE = Path("/proc/net/arp")
ARP_STATS = Path("/proc/net/stat/arp_cache")
GC_THRESH3 = Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3")
_ATF_COM = 0x2  # entry complete: the host answered ARP


def parse_arp_table(text: str) -> set[str]:
    """Addresses with a complete (answered) ARP entry, from /proc/net/arp text."""
    up: set[str] = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        try:
            flags = int(parts[2], 16)
        except ValueError:
            continue
        if flags & _ATF_COM and parts[3] != "00:00:00:00:00:00":
            up.add(parts[0])
    return up


@dataclass(frozen=True, slots=True)
class NeighbourStats:
    entries: int
    table_fulls: int
    unresolved_discards: int


def parse_arp_stats(text: str) -> NeighbourStats:
    """Sum the per-CPU rows of /proc/net/stat/arp_cache (hex columns; `entries` is global)."""
    lines = text.split("\n")
    header = lines[0].split()
    rows = [line.split() for line in lines[1:] if line.strip()]
    if not rows:
        raise ValueError("arp_cache stats: no rows")
    col = {name: i for i, name in enumerate(header)}

    def total(name: str) -> int:
        return sum(int(r[col[name]], 16) for r in rows)

    return NeighbourStats(
        entries=int(rows[0][col["entries"]], 16),
        table_fulls=total("table_fulls"),
        unresolved_discards=total("unresolved_discards"),
    )


def read_neighbour_stats() -> NeighbourStats | None:
    try:
        return parse_arp_stats(ARP_STATS.read_text())
    except (OSError, ValueError, KeyError, IndexError):
        return None


def read_gc_thresh3(default: int = 1024) -> int:
    try:
        return int(GC_THRESH3.read_text().strip())
    except (OSError, ValueError):
        return default


def local_addresses() -> set[str]:
    addrs: set[str] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name in ("AF_INET", "AF_INET6"):
                addrs.add(entry.address.split("%")[0])
    return addrs


def host_is_up(ip: str) -> bool:
    """True when `ip` is ours/loopback (a dead port there refuses at once) or answered ARP.

    Blocking (reads /proc): call it from a thread.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback or ip in local_addresses():
        return True
    if addr.version != 4:
        return False
    try:
        return ip in parse_arp_table(ARP_TABLE.read_text())
    except OSError:
        return False
