"""Bytes a process has moved over its TCP connections, from the kernel (netlink sock_diag).

Why not /proc/PID/io: its `wchar`/`rchar` count read(2)/write(2) only. ggml's RPC client talks
to its backends with send(2)/recv(2), which those counters never see (checked here: a llama-server
that sent 540 MB of tensors to a backend showed `wchar` 374, its log lines). The kernel keeps per
connection totals in `struct tcp_info` (`tcpi_bytes_acked`, `tcpi_bytes_received`, Linux 4.1+);
an INET_DIAG dump hands them to any user, without touching the connection.

Pure encode/parse functions, and one blocking reader (use a thread).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from corral.net import netlink

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_INET_DIAG_INFO = 2
_TCP_ESTABLISHED = 1
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then a 48-byte inet_diag_sockid.
_REQ = struct.Struct("=BBBxI48x")
# struct inet_diag_msg: family, state, timer, retrans; sockid (sport, dport big-endian, then
# addresses, interface, cookie); expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB2H44xIIIII")
_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info; tcpi_bytes_received follows
_MAX_SOCKETS = 65536  # a dump bigger than this is given up on: the caller sees "unknown"
_MAX_RECVS = 4096


@dataclass(frozen=True, slots=True)
class TcpBytes:
    """One TCP connection: its socket inode, local port, and bytes sent (acked) and received."""

    inode: int
    local_port: int
    sent: int
    received: int


def dump_request(family: int, seq: int = 1) -> bytes:
    """An INET_DIAG dump request: established TCP sockets of `family`, with their tcp_info."""
    body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), 1 << _TCP_ESTABLISHED)
    flags = _NLM_F_REQUEST | _NLM_F_DUMP
    return netlink.header(len(body), _SOCK_DIAG_BY_FAMILY, flags, seq) + body


def parse_dump(data: bytes) -> tuple[list[TcpBytes], bool]:
    """The connections in one netlink read, and whether the dump's DONE came.

    A socket without tcp_info (or a short one, before Linux 4.1) is left out. Raises ValueError
    on a malformed message or a netlink error reply."""
    found: list[TcpBytes] = []
    for kind, body in netlink.messages(data, "sock_diag"):
        if kind == netlink.NLMSG_DONE:
            return found, True
        if kind != _SOCK_DIAG_BY_FAMILY or len(body) < _MSG.size:
            continue
        fields = _MSG.unpack_from(body)
        sport, inode = socket.ntohs(fields[4]), fields[10]
        info = netlink.attributes(body[_MSG.size :], "sock_diag").get(_INET_DIAG_INFO, b"")
        if len(info) < _BYTES_ACKED + 16:
            continue
        sent, received = struct.unpack_from("=QQ", info, _BYTES_ACKED)
        found.append(TcpBytes(inode, sport, sent, received))
    return found, False


def read_tcp_bytes(inodes: Iterable[int]) -> list[TcpBytes] | None:
    """The established TCP connections among these socket inodes (IPv4 and IPv6), as the kernel
    counts them now; None when the kernel would not say (no sock_diag, dump too large).

    Blocking: call it in a thread. Reads this network namespace only."""
    wanted = set(inodes)
    out: list[TcpBytes] = []
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            found = _dump(family)
            if found is None:
                return None
            out += [c for c in found if c.inode in wanted]
    except (OSError, ValueError):
        return None
    return out


def _dump(family: int) -> list[TcpBytes] | None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        sock.send(dump_request(family))
        found: list[TcpBytes] = []
        for _ in range(_MAX_RECVS):
            part, done = parse_dump(sock.recv(1 << 16))
            found += part
            if done:
                return found
            if len(found) > _MAX_SOCKETS:
                return None
    return None
