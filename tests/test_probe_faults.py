"""The probe against servers that misbehave: fakes (tests/support/fake_servers.py says why), and a
fuzzer.

Every probe here must end with exactly one status, never raise, and never take longer than its
timeout plus a little slack, whatever the server sends or however it closes.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.rpc import protocol as p
from corral.rpc.probe import HTTP_NUDGE, Prober
from corral.types import Device, ProbeResult, Status
from tests.support import fake_servers
from tests.support.fake_servers import Conn, FakeServer, Script, fake_server

TIMEOUT = 0.6
SLACK = 0.25  # scheduling noise on a loaded CI machine; the probe itself adds ~nothing


@dataclass
class Outcome:
    result: ProbeResult
    elapsed: float
    server: FakeServer


async def probe_fake(script: Script, limit: float = TIMEOUT) -> Outcome:
    async with fake_server(script) as server:
        start = time.monotonic()
        result = await Prober(timeout=limit).probe(server.endpoint)
        elapsed = time.monotonic() - start
        await server.settled()  # every connection over: the fake has seen how the probe closed
        outcome = Outcome(result, elapsed, server)
    assert result.endpoint == server.endpoint
    assert elapsed <= limit + SLACK, f"probe took {elapsed:.3f}s, timeout {limit}s"
    return outcome


def first(server: FakeServer) -> Conn:
    assert server.conns, "the probe never connected"
    return server.conns[0]


# --- not an RPC server ------------------------------------------------------------------------


async def test_ssh_banner_is_not_rpc_at_once() -> None:
    out = await probe_fake(fake_servers.banner(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n"))
    assert out.result.status is Status.NOT_RPC
    assert out.result.error is not None and "SSH" in out.result.error
    assert out.elapsed < TIMEOUT / 2  # eight bytes are enough to know
    assert out.result.version is None and out.result.devices == ()


async def test_short_banner_then_silence_is_not_rpc_not_busy() -> None:
    # Five bytes, then nothing: a busy RPC server never sends a byte, so this is not "busy".
    out = await probe_fake(fake_servers.banner(b"+OK\r\n"))
    assert out.result.status is Status.NOT_RPC
    assert out.result.error is not None and "+OK" in out.result.error


async def test_http_server_that_waits_for_a_line_is_not_rpc() -> None:
    out = await probe_fake(fake_servers.http_line_server())
    assert out.result.status is Status.NOT_RPC
    assert out.result.error == "an HTTP server, not an RPC backend"
    # What it read: our HELLO, then the nudge that ends an HTTP request line.
    assert bytes(first(out.server).received) == p.encode_hello() + b"\r\n"
    assert HTTP_NUDGE.startswith(b"\r\n")


async def test_http_server_that_answers_at_once_is_not_rpc() -> None:
    out = await probe_fake(fake_servers.http_eager_server())
    assert out.result.status is Status.NOT_RPC
    assert out.result.error == "an HTTP server, not an RPC backend"
    assert out.elapsed < TIMEOUT / 2


@pytest.mark.parametrize(
    "junk",
    [b"\xff" * 64, b"\x00" * 7 + b"\x01" + b"\x00" * 40, bytes(range(256)), b"hello there\n"],
    ids=["ff", "size-2^56", "counting", "text"],
)
async def test_junk_reply_is_not_rpc(junk: bytes) -> None:
    out = await probe_fake(fake_servers.junk_after_hello(junk))
    assert out.result.status is Status.NOT_RPC
    assert out.result.version is None


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_instant_close_is_not_rpc(reset: bool) -> None:
    out = await probe_fake(fake_servers.instant_close(reset))
    assert out.result.status is Status.NOT_RPC
    assert out.result.error == "closed the connection without answering HELLO"
    # It closed on our HELLO the way an old server would, so the probe asked once more in the
    # old dialect — and no more than that.
    assert out.server.accepted == 2
    assert out.elapsed < TIMEOUT / 2


@pytest.mark.parametrize("n", [1, 4, 7, 8, 20, 35])
async def test_partial_reply_then_silence_is_not_rpc(n: int) -> None:
    out = await probe_fake(fake_servers.partial_reply(n, then_close=False))
    assert out.result.status is Status.NOT_RPC, out.result
    assert out.result.version is None


@pytest.mark.parametrize("n", [1, 7, 8, 35])
async def test_partial_reply_then_close_is_not_rpc(n: int) -> None:
    out = await probe_fake(fake_servers.partial_reply(n, then_close=True))
    assert out.result.status is Status.NOT_RPC
    assert out.elapsed < TIMEOUT / 2


@pytest.mark.parametrize("size", [p.HELLO_REPLY_SIZE + 1, 1 << 20, (1 << 64) - 1])
async def test_oversized_hello_reply_is_not_rpc_quickly(size: int) -> None:
    out = await probe_fake(fake_servers.oversized_hello(size))
    assert out.result.status is Status.NOT_RPC
    assert out.elapsed < TIMEOUT / 2
    assert first(out.server).ended == "reset"


async def test_endless_stream_does_not_hang_or_grow() -> None:
    async def flood(c: Conn) -> None:
        chunk = b"\x5a" * 65536
        for _ in range(200):  # 13 MB if nobody stops it
            await c.send(chunk)

    out = await probe_fake(flood)
    assert out.result.status is Status.NOT_RPC
    assert out.elapsed < TIMEOUT / 2


# --- versions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "status"),
    [
        ((8, 0, 0), Status.INCOMPATIBLE),  # major differs
        ((6, 0, 0), Status.INCOMPATIBLE),  # older major differs too
        ((7, 1, 0), Status.INCOMPATIBLE),  # newer minor
        ((7, 0, 9), Status.READY),  # newer patch is fine
    ],
)
async def test_version_decides_compatibility(version: tuple[int, int, int], status: Status) -> None:
    out = await probe_fake(fake_servers.rpc(version))
    assert out.result.status is status
    assert out.result.version == "{}.{}.{}".format(*version)
    assert out.result.latency_ms is not None and 0 < out.result.latency_ms < TIMEOUT * 1000
    if status is Status.INCOMPATIBLE:
        assert out.result.error is not None and "7.0" in out.result.error
        assert out.result.devices == ()
        # An incompatible server is not asked anything more, and is left with a reset.
        assert bytes(first(out.server).received) == p.encode_hello()
        assert first(out.server).ended == "reset"


async def test_client_protocol_is_taken_from_the_prober() -> None:
    # A llama-server built for protocol 8.1 accepts an 8.0.0 backend.
    async with fake_server(fake_servers.rpc((8, 0, 0))) as server:
        result = await Prober(timeout=TIMEOUT, client_major=8, client_minor=1).probe(
            server.endpoint
        )
    assert result.status is Status.READY


@pytest.mark.parametrize("reset", [True, False], ids=["closes-with-rst", "closes-with-fin"])
async def test_old_protocol_3_server_is_incompatible(reset: bool) -> None:
    out = await probe_fake(fake_servers.legacy((3, 0, 0), reset=reset))
    assert out.result.status is Status.INCOMPATIBLE, out.result
    assert out.result.version == "3.0.0"
    assert out.result.error is not None and "old RPC protocol 3.0.0" in out.result.error
    assert out.server.accepted == 2
    assert bytes(out.server.conns[1].received) == p.encode_legacy_hello()


# --- ready, and what ready must not accept ------------------------------------------------------


async def test_well_formed_server_with_two_devices_is_ready() -> None:
    devices = ((3 << 30, 8 << 30), (0, 1 << 20))
    out = await probe_fake(fake_servers.rpc((7, 0, 0), devices))
    assert out.result.status is Status.READY
    assert out.result.error is None
    assert out.result.devices == (Device(0, 3 << 30, 8 << 30), Device(1, 0, 1 << 20))
    conn = first(out.server)
    assert bytes(conn.received) == (
        p.encode_hello()
        + p.encode_device_count()
        + p.encode_get_device_memory(0)
        + p.encode_get_device_memory(1)
    )
    # All answered, nothing left queued: an orderly close frees the server at once.
    assert conn.ended == "eof"


async def test_server_answering_only_after_the_nudge_is_ready_without_devices() -> None:
    async def slow(c: Conn) -> None:
        await c.recv_exactly(fake_servers.HELLO_REQUEST_SIZE)
        await asyncio.sleep(TIMEOUT * 0.7)
        await c.send(fake_servers.hello_reply())
        await c.drain_forever()

    out = await probe_fake(slow)
    assert out.result.status is Status.READY
    assert out.result.version == "7.0.0"
    assert out.result.devices == ()
    assert out.result.error is not None and "late" in out.result.error
    conn = first(out.server)
    # The server will read the nudge as its next command: nothing more is asked, and the
    # connection is reset, so it cannot wait for the rest of that "command".
    assert bytes(conn.received) == p.encode_hello() + HTTP_NUDGE
    assert conn.ended == "reset"


@pytest.mark.parametrize(
    "after_hello",
    [
        fake_servers.device_count_reply(p.MAX_DEVICES + 1),
        fake_servers.reply(b"\x01\x00\x00"),  # count of 3 bytes
        fake_servers.device_count_reply(1) + fake_servers.device_memory_reply(5, 4),  # free > total
        fake_servers.device_count_reply(1) + fake_servers.reply(bytes(15)),
        fake_servers.device_count_reply(2)
        + fake_servers.device_memory_reply(1, 2),  # second one missing
    ],
    ids=["too-many", "short-count", "free-over-total", "short-memory", "missing-device"],
)
async def test_bad_device_replies_are_not_ready(after_hello: bytes) -> None:
    out = await probe_fake(
        fake_servers.scripted([(0, fake_servers.hello_reply() + after_hello)], "hold")
    )
    assert out.result.status is Status.NOT_RPC
    assert out.result.version == "7.0.0"
    assert out.result.error is not None and "device query failed" in out.result.error


async def test_silent_server_is_busy_and_is_left_with_a_reset() -> None:
    out = await probe_fake(fake_servers.silent())
    assert out.result.status is Status.BUSY
    assert out.elapsed >= TIMEOUT * 0.9  # it waited its time, no less
    conn = first(out.server)
    assert bytes(conn.received) == p.encode_hello() + HTTP_NUDGE
    # The SIGPIPE defence: a connection given up on is reset, never closed orderly.
    assert conn.ended == "reset"


# --- the fuzzer -------------------------------------------------------------------------------


def _u64(b: bytes) -> int:
    return int(struct.unpack("<Q", b)[0])


def oracle_hello(stream: bytes) -> tuple[int, int, int] | None:
    """The version, if `stream` starts with a well-formed protocol-7 HELLO reply."""
    if len(stream) < 8 + p.HELLO_REPLY_SIZE or _u64(stream[:8]) != p.HELLO_REPLY_SIZE:
        return None
    return stream[8], stream[9], stream[10]


def oracle_ready(stream: bytes) -> tuple[str, tuple[Device, ...]] | None:
    """What a correct probe makes of `stream` if it is a whole valid conversation, else None."""
    version = oracle_hello(stream)
    if version is None or version[0] != 7 or version[1] > 0:
        return None
    rest = stream[8 + p.HELLO_REPLY_SIZE :]
    if len(rest) < 12 or _u64(rest[:8]) != 4:
        return None
    count = int(struct.unpack("<I", rest[8:12])[0])
    if count > p.MAX_DEVICES:
        return None
    rest = rest[12:]
    devices = []
    for index in range(count):
        if len(rest) < 24 or _u64(rest[:8]) != 16:
            return None
        free, total = struct.unpack("<QQ", rest[8:24])
        if free > total:
            return None
        devices.append(Device(index, free, total))
        rest = rest[24:]
    return "{}.{}.{}".format(*version), tuple(devices)


def check_fuzz_outcome(out: Outcome, stream: bytes) -> None:
    r = out.result
    assert r.status is not Status.OFFLINE  # it listens and accepts: never "offline"
    if r.status is Status.READY:
        if r.error is not None:  # answered only after the nudge: HELLO alone was checked
            assert "late" in r.error and r.devices == ()
            hello = oracle_hello(stream)
            assert hello is not None and r.version == "{}.{}.{}".format(*hello)
        else:
            assert oracle_ready(stream) == (r.version, r.devices), r
    elif r.status is Status.INCOMPATIBLE:
        hello = oracle_hello(stream)
        legacy = len(stream) >= 11 and _u64(stream[:8]) == p.LEGACY_HELLO_REPLY_SIZE
        assert hello is not None or legacy, r
        if hello is not None:
            assert r.version == "{}.{}.{}".format(*hello)
            assert not p.is_compatible(p.Version(*hello), 7, 0)
    elif r.status is Status.BUSY:
        # Busy means: accepted and said nothing for the whole timeout (run_fuzz_case checks that
        # nothing was sent well before the verdict).
        assert out.elapsed >= FUZZ_TIMEOUT * 0.9


FUZZ_TIMEOUT = 0.3
delays = st.sampled_from([0.0, 0.0, 0.0, 0.002, 0.01, 0.03])
endings = st.sampled_from(["fin", "fin", "rst", "rst", "hold"])


def run_fuzz_case(chunks: list[tuple[float, bytes]], end: str) -> Outcome:
    async def case() -> Outcome:
        async with fake_server(fake_servers.scripted(chunks, end)) as server:
            start = time.monotonic()
            result = await Prober(timeout=FUZZ_TIMEOUT).probe(server.endpoint)
            verdict_at = time.monotonic()
            elapsed = verdict_at - start
            # Nothing may have been sent long before a "busy" verdict (loopback delivers in µs).
            if result.status is Status.BUSY:
                for c in server.conns:
                    assert all(t > verdict_at - 0.05 for t in c.sent_at), (result, c.sent_at)
            return Outcome(result, elapsed, server)

    out = asyncio.run(case())
    assert out.elapsed <= FUZZ_TIMEOUT + SLACK, f"probe took {out.elapsed:.3f}s"
    return out


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    chunks=st.lists(st.tuples(delays, st.binary(min_size=1, max_size=48)), max_size=4),
    end=endings,
)
def test_fuzz_arbitrary_bytes_never_break_the_probe(
    chunks: list[tuple[float, bytes]], end: str
) -> None:
    out = run_fuzz_case(chunks, end)
    check_fuzz_outcome(out, b"".join(data for _, data in chunks))


@st.composite
def mutated_conversations(draw: st.DrawFn) -> tuple[list[tuple[float, bytes]], bool, bytes]:
    version = draw(st.sampled_from([(7, 0, 0), (7, 0, 4), (7, 1, 0), (8, 0, 0), (6, 3, 0)]))
    totals = draw(st.lists(st.integers(0, (1 << 64) - 1), max_size=3))
    devices = [(draw(st.integers(0, total)), total) for total in totals]
    data = bytearray(fake_servers.conversation(version, devices))
    mutation = draw(st.sampled_from(["none", "none", "flip", "truncate", "insert", "append"]))
    if mutation == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif mutation == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif mutation == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    elif mutation == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    bounds = [0, *cuts, len(data)]
    chunks = [
        (draw(st.sampled_from([0.0, 0.0, 0.002, 0.01])), bytes(data[a:b]))
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]
    return chunks, mutation == "none", bytes(data)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=mutated_conversations(), end=st.sampled_from(["fin", "hold", "rst"]))
def test_fuzz_mutated_conversations(
    case: tuple[list[tuple[float, bytes]], bool, bytes], end: str
) -> None:
    chunks, intact, stream = case
    out = run_fuzz_case(chunks, end)
    check_fuzz_outcome(out, stream)
    if intact and end == "hold":
        # An intact conversation, sent in pieces, and the connection held: judged exactly.
        hello = oracle_hello(stream)
        assert hello is not None
        want = Status.READY if p.is_compatible(p.Version(*hello), 7, 0) else Status.INCOMPATIBLE
        assert out.result.status is want, out.result
        if want is Status.READY:
            assert out.result.error is None


async def test_ipv6_loopback_endpoint() -> None:
    async with fake_server(fake_servers.rpc(), host="::1") as server:
        assert str(server.endpoint).startswith("[::1]:")
        result = await Prober(timeout=TIMEOUT).probe(server.endpoint)
    assert result.status is Status.READY
    assert result.endpoint.host == "::1"


async def test_held_endpoint_is_busy_without_a_connection() -> None:
    async with fake_server(fake_servers.rpc()) as server:
        prober = Prober(timeout=TIMEOUT, held={server.endpoint})
        result = await prober.probe(server.endpoint)
        # Any connection the probe had opened would be accepted before this one of ours.
        assert await server.accepted_before_ours() == 0
    assert result.status is Status.BUSY
    assert result.error == "in use by the coordinator (not probed)"


async def test_concurrent_probes_of_one_endpoint_share_one_connection() -> None:
    async with fake_server(fake_servers.rpc()) as server:
        prober = Prober(timeout=TIMEOUT)
        results = await asyncio.gather(*(prober.probe(server.endpoint) for _ in range(5)))
        assert server.accepted == 1
        assert [r.status for r in results] == [Status.READY] * 5
        # Once done, the next probe connects afresh.
        assert (await prober.probe(server.endpoint)).status is Status.READY
        assert server.accepted == 2
