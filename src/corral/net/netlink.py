"""Netlink framing (pure): the message and attribute headers every netlink family shares.

Used by the neighbour-table reader (rtnetlink) and the per-connection byte counts (sock_diag);
each builds its own requests and reads its own payloads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTA_HDR = struct.Struct("=HH")  # len, type
NLMSG_ERROR = 2
NLMSG_DONE = 3


def align4(n: int) -> int:
    return (n + 3) & ~3


def header(length: int, kind: int, flags: int, seq: int) -> bytes:
    """A message header for a body of `length` bytes (the header's own size is added)."""
    return NLMSG_HDR.pack(NLMSG_HDR.size + length, kind, flags, seq, 0)


def messages(data: bytes, who: str = "netlink") -> Iterator[tuple[int, bytes]]:
    """(type, body) of each message in `data`; an error reply or a truncated message raises
    ValueError naming `who`. Acknowledgements (error code 0) are skipped."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            raise ValueError(f"{who}: truncated message")
        body = data[offset + NLMSG_HDR.size : offset + length]
        offset += align4(length)
        if kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", body)[0] if len(body) >= 4 else -1
            if code != 0:
                raise ValueError(f"{who}: netlink error {code}")
            continue
        yield kind, body


def attributes(data: bytes, who: str = "netlink") -> dict[int, bytes]:
    """Each attribute's payload by type (the nested and byte-order flags masked off)."""
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + RTA_HDR.size <= len(data):
        length, kind = RTA_HDR.unpack_from(data, offset)
        if length < RTA_HDR.size or offset + length > len(data):
            raise ValueError(f"{who}: truncated attribute")
        attrs[kind & 0x3FFF] = data[offset + RTA_HDR.size : offset + length]
        offset += align4(length)
    return attrs
