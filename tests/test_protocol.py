"""ggml RPC wire messages: pure encode/decode, checked byte by byte and by property."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.llama.binaries import build_root
from corral.rpc import protocol as p

U64 = (1 << 64) - 1


def test_hello_is_command_14_with_24_zero_capability_bytes() -> None:
    hello = p.encode_hello()
    assert hello == b"\x0e" + b"\x18" + b"\x00" * 7 + b"\x00" * 24
    assert len(hello) == 33


def test_legacy_hello_has_an_empty_payload() -> None:
    assert p.encode_legacy_hello() == b"\x0e" + b"\x00" * 8


def test_device_count_request() -> None:
    assert p.encode_device_count() == b"\x0f" + b"\x00" * 8


def test_get_device_memory_request_carries_a_u32_index() -> None:
    assert p.encode_get_device_memory(3) == b"\x0b" + b"\x04" + b"\x00" * 7 + b"\x03\x00\x00\x00"
    with pytest.raises(struct.error):
        p.encode_get_device_memory(1 << 32)


def test_decode_size() -> None:
    p.decode_size(struct.pack("<Q", 28), 28, "HELLO")
    with pytest.raises(p.ProtocolError, match="HELLO: reply size 29, expected 28"):
        p.decode_size(struct.pack("<Q", 29), 28, "HELLO")
    with pytest.raises(p.ProtocolError, match="short size header"):
        p.decode_size(b"\x1c\x00\x00", 28, "HELLO")
    with pytest.raises(p.ProtocolError, match=f"reply size {U64}"):
        p.decode_size(b"\xff" * 8, 28, "HELLO")


def test_decode_hello() -> None:
    payload = bytes([7, 0, 0, 0]) + bytes(24)
    assert p.decode_hello(payload) == p.Version(7, 0, 0)
    assert str(p.decode_hello(bytes([8, 1, 12, 0]) + b"\xff" * 24)) == "8.1.12"
    for bad in (b"", payload[:-1], payload + b"\x00", bytes([7, 0, 0])):
        with pytest.raises(p.ProtocolError, match="HELLO"):
            p.decode_hello(bad)


def test_decode_legacy_hello() -> None:
    assert p.decode_legacy_hello(b"\x03\x00\x00") == p.Version(3, 0, 0)
    with pytest.raises(p.ProtocolError, match="expected 3"):
        p.decode_legacy_hello(b"\x03\x00\x00\x00")


def test_decode_device_count() -> None:
    assert p.decode_device_count(struct.pack("<I", 2)) == 2
    assert p.decode_device_count(struct.pack("<I", p.MAX_DEVICES)) == p.MAX_DEVICES
    with pytest.raises(p.ProtocolError, match="implausible count"):
        p.decode_device_count(struct.pack("<I", p.MAX_DEVICES + 1))
    with pytest.raises(p.ProtocolError, match="expected 4"):
        p.decode_device_count(b"\x01\x00")


def test_decode_device_memory() -> None:
    assert p.decode_device_memory(struct.pack("<QQ", 5, 9)) == (5, 9)
    assert p.decode_device_memory(struct.pack("<QQ", U64, U64)) == (U64, U64)
    with pytest.raises(p.ProtocolError, match="free 10 exceeds total 9"):
        p.decode_device_memory(struct.pack("<QQ", 10, 9))
    with pytest.raises(p.ProtocolError, match="expected 16"):
        p.decode_device_memory(bytes(15))


@pytest.mark.parametrize(
    ("server", "ok"),
    [
        ((7, 0, 0), True),
        ((7, 0, 200), True),  # patch never matters
        ((7, 1, 0), False),  # newer minor
        ((8, 0, 0), False),  # other major
        ((6, 0, 0), False),
        ((6, 9, 9), False),
        ((3, 0, 0), False),
    ],
)
def test_compatibility_rule(server: tuple[int, int, int], ok: bool) -> None:
    assert p.is_compatible(p.Version(*server), 7, 0) is ok


def test_older_minor_is_accepted_by_a_newer_client() -> None:
    assert p.is_compatible(p.Version(7, 0, 0), 7, 2)
    assert not p.is_compatible(p.Version(7, 3, 0), 7, 2)


def test_constants_match_the_llama_cpp_source_corral_builds() -> None:
    """The numbers above were read from ggml-rpc; check them against the source tree we build."""
    src = build_root() / "src" / "llama.cpp" / "ggml"
    header, impl = src / "include" / "ggml-rpc.h", src / "src" / "ggml-rpc" / "ggml-rpc.cpp"
    if not (header.is_file() and impl.is_file()):
        pytest.skip(f"llama.cpp source not unpacked at {src} (corral llama install)")
    h = header.read_text()
    found = [re.search(rf"RPC_PROTO_{part}_VERSION\s+(\d+)", h) for part in ("MAJOR", "MINOR")]
    assert found[0] is not None and found[1] is not None
    source_version = (int(found[0].group(1)), int(found[1].group(1)))
    assert source_version == (p.CLIENT_PROTO_MAJOR, p.CLIENT_PROTO_MINOR)
    text = impl.read_text()
    enum = re.search(r"enum rpc_cmd \{(.*?)\};", text, re.S)
    assert enum is not None
    names = [n.strip().split("=")[0].strip() for n in enum.group(1).split(",") if n.strip()]
    for cmd in p.Command:
        assert names.index(f"RPC_CMD_{cmd.name}") == cmd.value
    rpc_sources = "".join(f.read_text() for f in impl.parent.glob("*.h")) + h
    caps = re.search(r"RPC_CONN_CAPS_SIZE\s*=?\s*(\d+)", rpc_sources)
    assert caps is not None, "RPC_CONN_CAPS_SIZE not found in the ggml-rpc sources"
    assert int(caps.group(1)) == p.CONN_CAPS_SIZE


def _split_request(data: bytes) -> tuple[int, int, bytes]:
    cmd, size = struct.unpack("<BQ", data[:9])
    return int(cmd), int(size), data[9:]


@settings(max_examples=200, deadline=None)
@given(command=st.sampled_from(list(p.Command)), payload=st.binary(max_size=300))
def test_request_layout_round_trips(command: p.Command, payload: bytes) -> None:
    cmd, size, rest = _split_request(p.encode_request(command, payload))
    assert (cmd, size, rest) == (int(command), len(payload), payload)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, (1 << 32) - 1))
def test_device_memory_request_round_trips(index: int) -> None:
    cmd, size, rest = _split_request(p.encode_get_device_memory(index))
    assert (cmd, size) == (11, 4)
    assert struct.unpack("<I", rest) == (index,)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, U64), data=st.data())
def test_device_memory_reply_round_trips(total: int, data: st.DataObject) -> None:
    free = data.draw(st.integers(0, total))
    assert p.decode_device_memory(struct.pack("<QQ", free, total)) == (free, total)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=28, max_size=28))
def test_hello_reply_version_is_its_first_three_bytes(payload: bytes) -> None:
    v = p.decode_hello(payload)
    assert (v.major, v.minor, v.patch) == (payload[0], payload[1], payload[2])
    assert str(v) == f"{payload[0]}.{payload[1]}.{payload[2]}"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40))
def test_decoders_accept_or_raise_protocol_error_only(data: bytes) -> None:
    decoders: list[Callable[[bytes], object]] = [
        p.decode_hello,
        p.decode_legacy_hello,
        p.decode_device_count,
        p.decode_device_memory,
        lambda b: p.decode_size(b, 28, "x"),
    ]
    for decode in decoders:
        try:
            decode(data)
        except p.ProtocolError as exc:
            assert str(exc)


@settings(max_examples=200, deadline=None)
@given(
    server=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    client=st.tuples(st.integers(0, 255), st.integers(0, 255)),
)
def test_compatible_means_same_major_and_minor_not_newer(
    server: tuple[int, int, int], client: tuple[int, int]
) -> None:
    ok = p.is_compatible(p.Version(*server), *client)
    assert ok == (server[0] == client[0] and server[1] <= client[1])
