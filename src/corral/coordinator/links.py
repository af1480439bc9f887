"""Is a backend the coordinator holds still there? Asked without ever connecting to it.

A held backend serves llama-server alone; a probe would only queue behind it. But llama-server
keeps one TCP connection to every backend for its whole life, and when the backend process dies
the kernel closes that connection: llama-server's end turns CLOSE_WAIT (or vanishes) at once,
long before llama-server itself notices on its next request. So we read the state of
llama-server's own sockets (psutil, /proc) — for a remote backend too, as long as its host is
up to send the FIN. A backend on this machine is also checked for a listener on its port
(nothing listening = its port refuses). A host that vanished silently is left to its node's
heartbeat.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

from corral.endpoint import Endpoint
from corral.llama.processes import local_listener_state


@dataclass(frozen=True, slots=True)
class Link:
    """One TCP connection of llama-server: remote address, port and kernel state."""

    ip: str
    port: int
    status: str


def judge(
    links: Iterable[Link],
    addresses: Mapping[Endpoint, frozenset[str]],
    seen: set[Endpoint],
) -> dict[Endpoint, str]:
    """Pure: the held backends whose connection broke, and how.

    `addresses` maps each held endpoint to the IPs it resolves to. A backend counts only once
    its connection was seen established (`seen` is updated here): llama-server may never open
    one (no layers offloaded to it), and that must not read as a loss.
    """
    by_endpoint: dict[Endpoint, list[str]] = {e: [] for e in addresses}
    for link in links:
        for ep, ips in addresses.items():
            if link.port == ep.port and _canon(link.ip) in ips:
                by_endpoint[ep].append(link.status)
    lost: dict[Endpoint, str] = {}
    for ep, states in by_endpoint.items():
        if psutil.CONN_ESTABLISHED in states and all(s == psutil.CONN_ESTABLISHED for s in states):
            seen.add(ep)
        elif ep in seen:
            closed = [s for s in states if s != psutil.CONN_ESTABLISHED]
            lost[ep] = (
                f"backend closed its connection ({closed[0]})"
                if closed
                else "connection to it is gone"
            )
    return lost


def read_links(pid: int) -> list[Link] | None:
    """llama-server's TCP connections; None when it cannot be read. Blocking: use a thread.

    A dying process loses its sockets before it becomes a zombie, and a zombie has none: that
    is "cannot tell", never "no connections", which would read as every held backend lost (a
    failover instead of the crash it is). A llama-server that serves listens on its HTTP port;
    without that listener its other sockets say nothing either (dying, or not up yet)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        conns = proc.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if not any(c.status == psutil.CONN_LISTEN for c in conns):
        return None
    return [Link(c.raddr.ip, c.raddr.port, c.status) for c in conns if c.raddr]


def resolve(endpoints: Iterable[Endpoint]) -> dict[Endpoint, frozenset[str]]:
    """The IPs each endpoint names (blocking for host names: use a thread)."""
    out: dict[Endpoint, frozenset[str]] = {}
    for ep in endpoints:
        if ep.is_ip:
            out[ep] = frozenset({_canon(ep.host)})
            continue
        try:
            infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
        except OSError:
            out[ep] = frozenset()
            continue
        out[ep] = frozenset(_canon(str(info[4][0])) for info in infos)
    return out


def not_listening(endpoints: Iterable[Endpoint]) -> dict[Endpoint, str]:
    """Local backends with nothing listening on their port. Blocking: use a thread."""
    try:
        return {
            ep: "nothing listens on its port any more"
            for ep in endpoints
            if local_listener_state(ep) is False
        }
    except psutil.Error:  # cannot see the machine's sockets: no verdict
        return {}


def _canon(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return addr.compressed
