"""What the kernel knows about hosts on the local link: pure parsers plus small readers.

Used for three things the TCP handshake alone cannot tell or do:
- a connect that timed out to a host that *is* up (the neighbour entry is complete, or the address
  is our own) is a backend whose accept queue is full, not a dead host (see the facts file);
- a large on-link scan must not overflow the neighbour table, or SYNs to live hosts are dropped;
- a large on-link scan is fast only if it skips the silent addresses: an ARP sweep (raw frames,
  needs CAP_NET_RAW) finds the hosts that are up without putting one entry per silent address in
  the kernel's table.

Kernel facts this module relies on (checked on Linux 6.x, see docs in the scan module):
- The IPv4 neighbour table (`arp_cache`) is ONE table shared by every network namespace: its
  entry count, its gc_thresh1-3 and its counters (table_fulls, ...) are global. A process in a
  non-initial namespace has no /proc/net/stat/arp_cache and no neigh/default/gc_thresh*, but a
  netlink RTM_GETNEIGHTBL dump answers in every namespace with the global numbers.
- A connect to a silent on-link address creates an INCOMPLETE entry that lives for the ARP
  retries (mcast_solicit + app_solicit) x retrans_time, 3 x 1 s by default, and that forced
  garbage collection cannot reclaim. Once gc_thresh3 entries exist, new entries fail
  (table_fulls) and the packet that needed one is dropped.
- ARP replies to requests the kernel did not send do not create neighbour entries (arp_accept=0).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from corral.net import netlink

ARP_TABLE = Path("/proc/net/arp")
ARP_STATS = Path("/proc/net/stat/arp_cache")
GC_THRESH3 = Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3")
NEIGH_SYSCTL = Path("/proc/sys/net/ipv4/neigh")
DEFAULT_GC_THRESH3 = 1024
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


# --- the neighbour table's size and counters -----------------------------------------------


@dataclass(frozen=True, slots=True)
class NeighbourStats:
    """The IPv4 neighbour table as a whole (global across network namespaces)."""

    entries: int
    table_fulls: int
    gc_thresh3: int = DEFAULT_GC_THRESH3
    forced_gc_runs: int = 0


def parse_arp_stats(text: str, gc_thresh3: int = DEFAULT_GC_THRESH3) -> NeighbourStats:
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
        gc_thresh3=gc_thresh3,
        forced_gc_runs=total("forced_gc_runs"),
    )


_RTM_NEWNEIGHTBL = 64
_RTM_GETNEIGHTBL = 66
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NDTA_NAME, _NDTA_THRESH3, _NDTA_CONFIG, _NDTA_STATS = 1, 4, 5, 7
_NDTM_SIZE = 4  # struct ndtmsg: family, pad1, pad2
_NDT_STATS_FIELDS = 11  # struct ndt_stats: 11 x u64 in every kernel since 2.6.15
_NDTS_FORCED_GC_RUNS, _NDTS_TABLE_FULLS = 9, 10


def neightbl_request(seq: int = 1) -> bytes:
    """A netlink RTM_GETNEIGHTBL dump request for the IPv4 tables."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    flags = _NLM_F_REQUEST | _NLM_F_DUMP
    return netlink.header(len(body), _RTM_GETNEIGHTBL, flags, seq) + body


def parse_neightbl_dump(
    data: bytes, table: str = "arp_cache"
) -> tuple[NeighbourStats | None, bool]:
    """Find `table` in RTM_NEWNEIGHTBL messages; also say whether the dump's DONE was seen.

    Raises ValueError on a malformed message or a netlink error reply.
    """
    found: NeighbourStats | None = None
    done = False
    for kind, body in netlink.messages(data):
        if kind == netlink.NLMSG_DONE:
            done = True
            break
        if kind != _RTM_NEWNEIGHTBL:
            continue
        attrs = netlink.attributes(body[_NDTM_SIZE:])
        name = attrs.get(_NDTA_NAME, b"").split(b"\0", 1)[0].decode("ascii", "replace")
        if name != table or _NDTA_STATS not in attrs or _NDTA_CONFIG not in attrs:
            continue  # per-device parameter messages carry the name but no stats
        stats = attrs[_NDTA_STATS]
        if len(stats) < 8 * _NDT_STATS_FIELDS or len(attrs[_NDTA_CONFIG]) < 8:
            raise ValueError("netlink: short neighbour table attributes")
        counters = struct.unpack_from(f"={_NDT_STATS_FIELDS}Q", stats)
        thresh3 = attrs.get(_NDTA_THRESH3)
        found = NeighbourStats(
            entries=struct.unpack_from("=I", attrs[_NDTA_CONFIG], 4)[0],
            table_fulls=counters[_NDTS_TABLE_FULLS],
            gc_thresh3=struct.unpack("=I", thresh3[:4])[0] if thresh3 else DEFAULT_GC_THRESH3,
            forced_gc_runs=counters[_NDTS_FORCED_GC_RUNS],
        )
    return found, done


def _read_neighbour_stats_netlink() -> NeighbourStats | None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(1.0)
        sock.send(neightbl_request())
        found: NeighbourStats | None = None
        for _ in range(64):  # a dump is a handful of messages; bounded anyway
            stats, done = parse_neightbl_dump(sock.recv(1 << 16))
            found = stats or found
            if done:
                return found
    return found


_RTM_NEWNEIGH = 28
_RTM_GETNEIGH = 30
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
NUD_FAILED = 0x20


def neigh_request(seq: int = 1) -> bytes:
    """A netlink RTM_GETNEIGH dump request for this namespace's IPv4 neighbour entries."""
    body = _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0)
    flags = _NLM_F_REQUEST | _NLM_F_DUMP
    return netlink.header(len(body), _RTM_GETNEIGH, flags, seq) + body


def parse_neigh_states(data: bytes) -> tuple[list[int], bool]:
    """The NUD states of the RTM_NEWNEIGH messages in `data`; and whether DONE was seen."""
    states: list[int] = []
    for kind, body in netlink.messages(data):
        if kind == netlink.NLMSG_DONE:
            return states, True
        if kind == _RTM_NEWNEIGH and len(body) >= _NDMSG.size:
            states.append(_NDMSG.unpack_from(body)[4])
    return states, False


def count_failed_neighbours() -> int:
    """FAILED IPv4 neighbour entries of this namespace: ones the kernel reclaims when it must.

    The global entry count includes them (a previous scan's silent addresses, for a while), but
    they do not stand in the way of new entries, so a pacer must not count them as taken.
    """
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(1.0)
            sock.send(neigh_request())
            failed = 0
            for _ in range(4096):  # bounded: the table holds at most gc_thresh3 entries
                states, done = parse_neigh_states(sock.recv(1 << 16))
                failed += sum(1 for state in states if state & NUD_FAILED)
                if done:
                    return failed
    except (OSError, ValueError):
        pass
    return 0


def read_neighbour_stats() -> NeighbourStats | None:
    """The global IPv4 neighbour table, from any network namespace; None when unreadable."""
    with contextlib.suppress(OSError, ValueError):
        stats = _read_neighbour_stats_netlink()
        if stats is not None:
            return stats
    try:  # the initial namespace's /proc view (no netlink, e.g. a restricted sandbox)
        return parse_arp_stats(ARP_STATS.read_text(), read_gc_thresh3())
    except (OSError, ValueError, KeyError, IndexError):
        return None


def read_gc_thresh3(default: int = DEFAULT_GC_THRESH3) -> int:
    """gc_thresh3 from sysctl: only visible in the initial namespace (netlink sees it always)."""
    try:
        return int(GC_THRESH3.read_text().strip())
    except (OSError, ValueError):
        return default


def incomplete_lifetime(interface: str, default: float = 3.0) -> float:
    """Seconds an unanswered neighbour entry on `interface` stays INCOMPLETE (per namespace)."""

    def value(name: str) -> int | None:
        try:
            return int((NEIGH_SYSCTL / interface / name).read_text().strip())
        except (OSError, ValueError):
            return None

    mcast, app, retrans = value("mcast_solicit"), value("app_solicit"), value("retrans_time_ms")
    if mcast is None or retrans is None:
        return default
    return max(1, mcast + (app or 0)) * retrans / 1000.0


# --- the machine's on-link networks ---------------------------------------------------------

_SIOCGIFFLAGS = 0x8913
_SIOCGIFHWADDR = 0x8927
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_NOARP = 0x80
_ARPHRD_ETHER = 1


@dataclass(frozen=True, slots=True)
class Link:
    """One IPv4 address of ours on an Ethernet-like interface that speaks ARP."""

    interface: str
    mac: bytes
    address: ipaddress.IPv4Address
    network: ipaddress.IPv4Network


def _ifreq(interface: str, request: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        raw = struct.pack("16s16s", interface.encode()[:15], b"")
        return bytes(fcntl.ioctl(sock.fileno(), request, raw))


def _arp_interface_mac(interface: str) -> bytes | None:
    """The MAC of `interface` when it is up, Ethernet-like and uses ARP; else None."""
    try:
        flags = struct.unpack_from("H", _ifreq(interface, _SIOCGIFFLAGS), 16)[0]
        hw = _ifreq(interface, _SIOCGIFHWADDR)
    except OSError:
        return None
    family = struct.unpack_from("H", hw, 16)[0]
    if family != _ARPHRD_ETHER or flags & (_IFF_LOOPBACK | _IFF_NOARP) or not flags & _IFF_UP:
        return None
    return hw[18:24]


def arp_links() -> list[Link]:
    """Our IPv4 addresses on interfaces that resolve neighbours with ARP (this namespace)."""
    links: list[Link] = []
    for interface, entries in psutil.net_if_addrs().items():
        addrs = [e for e in entries if e.family == socket.AF_INET and e.netmask]
        if not addrs:
            continue
        mac = _arp_interface_mac(interface)
        if mac is None:
            continue
        for entry in addrs:
            iface = ipaddress.IPv4Interface(f"{entry.address}/{entry.netmask}")
            links.append(Link(interface, mac, iface.ip, iface.network))
    return links


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


# --- the ARP sweep --------------------------------------------------------------------------

_ETH_P_ARP = 0x0806
_ARP_REQUEST, _ARP_REPLY = 1, 2
_ARP_HEAD = struct.Struct("!HHBBH")  # htype, ptype, hlen, plen, op
_PACKET_OUTGOING = 4
_MIN_FRAME = 60
_TPA = slice(38, 42)  # target protocol address inside an Ethernet+ARP frame


def arp_request_frame(src_mac: bytes, src_ip: ipaddress.IPv4Address, target: int) -> bytes:
    """A broadcast Ethernet frame asking who has `target` (an IPv4 address as int)."""
    eth = b"\xff" * 6 + src_mac + struct.pack("!H", _ETH_P_ARP)
    arp = _ARP_HEAD.pack(1, 0x0800, 6, 4, _ARP_REQUEST) + src_mac + src_ip.packed
    arp += b"\0" * 6 + target.to_bytes(4, "big")
    return (eth + arp).ljust(_MIN_FRAME, b"\0")


def parse_arp_reply(frame: bytes, our_ip: bytes) -> int | None:
    """The sender address (int) of an ARP reply addressed to `our_ip`, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    if _ARP_HEAD.unpack_from(frame, 14) != (1, 0x0800, 6, 4, _ARP_REPLY):
        return None
    if frame[_TPA] != our_ip:
        return None
    return int.from_bytes(frame[28:32], "big")


@dataclass(frozen=True, slots=True)
class SweepResult:
    up: list[ipaddress.IPv4Address]
    asked: int  # ARP requests sent, all passes
    seconds: float


def arp_sweep(
    link: Link,
    network: ipaddress.IPv4Network,
    rate: float = 8000.0,
    passes: int = 2,
    settle: float = 0.25,
) -> SweepResult:
    """Ask every host address of `network` (on `link`) who is there; return those that answer.

    Blocking, call it from a thread. Sends `rate` requests per second; the second pass asks again
    only the addresses that have not answered (a lost request or reply must not lose a host).
    Ends by itself after about passes x (addresses / rate + settle) seconds. Needs CAP_NET_RAW
    (PermissionError otherwise). Creates no kernel neighbour entries for silent addresses.
    """
    start = time.monotonic()
    first = int(network.network_address)
    last = int(network.broadcast_address)
    if network.prefixlen < 31:
        first, last = first + 1, last - 1
    ours = int(link.address)
    up: set[int] = set()
    asked = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as sock:
        sock.bind((link.interface, _ETH_P_ARP))
        sock.setblocking(False)
        _grow_receive_buffer(sock, 4 << 20)
        frame = bytearray(arp_request_frame(link.mac, link.address, first))
        our_ip = link.address.packed
        for _ in range(max(1, passes)):
            sent = 0
            pass_start = time.monotonic()
            for target in range(first, last + 1):
                if target == ours or target in up:
                    continue
                frame[_TPA] = target.to_bytes(4, "big")
                _send(sock, frame)
                sent += 1
                if sent % 32 == 0:
                    _drain(sock, our_ip, up, first, last)
                    delay = pass_start + sent / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            asked += sent
            settle_end = time.monotonic() + settle
            while (left := settle_end - time.monotonic()) > 0:
                _drain(sock, our_ip, up, first, last)
                time.sleep(min(0.005, left))
            _drain(sock, our_ip, up, first, last)
    addresses = sorted(ipaddress.IPv4Address(a) for a in up)
    return SweepResult(addresses, asked, time.monotonic() - start)


def _grow_receive_buffer(sock: socket.socket, size: int) -> None:
    so_rcvbufforce = getattr(socket, "SO_RCVBUFFORCE", 33)
    try:
        sock.setsockopt(socket.SOL_SOCKET, so_rcvbufforce, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _send(sock: socket.socket, frame: bytearray) -> None:
    for _ in range(200):  # the device queue is full: wait for it, at most about 0.2 s
        try:
            sock.send(frame)
            return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
        time.sleep(0.001)
    raise OSError(errno.ENOBUFS, "ARP sweep: the interface does not take more frames")


def _drain(sock: socket.socket, our_ip: bytes, up: set[int], first: int, last: int) -> None:
    while True:
        try:
            frame, addr = sock.recvfrom(128)
        except (BlockingIOError, InterruptedError):
            return
        if len(addr) > 2 and addr[2] == _PACKET_OUTGOING:
            continue
        sender = parse_arp_reply(frame, our_ip)
        if sender is not None and first <= sender <= last:
            up.add(sender)


def addresses_in(network: ipaddress.IPv4Network, addresses: Iterable[str]) -> list[str]:
    """Those of `addresses` (text) that are IPv4 addresses inside `network`."""
    inside: list[str] = []
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(addr, ipaddress.IPv4Address) and addr in network:
            inside.append(addr.compressed)
    return inside
