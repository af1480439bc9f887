"""The probe against REAL ggml-rpc-server (and llama-server) processes on loopback.

These are the behaviours the facts file warns about (one client at a time, a backlog of 1, death
by SIGPIPE): only the real binary can show them, so nothing here is faked.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.supervisor import Child
from corral.rpc import protocol as p
from corral.rpc.probe import Prober
from corral.types import Status
from tests.support.llama_server import running_llama_server
from tests.support.loopback import free_port
from tests.support.rpc_backends import StartRpc, wait_status

BUSY_TIMEOUT = 0.3  # busy probes take their whole timeout; keep them short


def hold(ep: Endpoint) -> socket.socket:
    """A real client, as a coordinator is: completes HELLO, then keeps the connection."""
    s = socket.create_connection((ep.host, ep.port), timeout=5)
    s.sendall(p.encode_hello())
    data = b""
    while len(data) < 8 + p.HELLO_REPLY_SIZE:
        chunk = s.recv(64)
        assert chunk, "the server closed on a HELLO"
        data += chunk
    return s


async def wait_exit(child: Child, seconds: float) -> int | None:
    assert child.process is not None
    try:
        return await asyncio.wait_for(child.process.wait(), seconds)
    except TimeoutError:
        return None


async def test_idle_backend_is_ready_with_version_devices_latency(rpc_server: StartRpc) -> None:
    ep, child = await rpc_server()
    result = await Prober(timeout=2).probe(ep)
    assert result.status is Status.READY, result
    assert result.version == "7.0.0"
    assert result.error is None
    assert len(result.devices) >= 1
    for index, dev in enumerate(result.devices):
        assert dev.index == index
        assert 0 < dev.free_bytes <= dev.total_bytes
    assert result.latency_ms is not None and 0 < result.latency_ms < 2000
    assert child.returncode is None


async def test_probe_frees_the_slot_at_once(rpc_server: StartRpc) -> None:
    # The server serves one client at a time. If a probe kept its connection a moment too long,
    # the second of two simultaneous probes would wait behind it and look busy. (Two, not more:
    # a backlog of 1 queues two connections; a third SYN would be dropped and retried after 1 s.)
    # Two Probers: one Prober joins concurrent probes of an endpoint into one connection.
    ep, child = await rpc_server()
    for _ in range(3):
        start = time.monotonic()
        results = await asyncio.gather(Prober(timeout=1.0).probe(ep), Prober(timeout=1.0).probe(ep))
        assert [r.status for r in results] == [Status.READY] * 2, results
        assert time.monotonic() - start < 0.5
    assert child.returncode is None


async def test_nothing_listening_is_offline_refused(loopback_host: str) -> None:
    ep = Endpoint(loopback_host, free_port(loopback_host))
    start = time.monotonic()
    result = await Prober(timeout=1.0).probe(ep)
    assert result.status is Status.OFFLINE
    assert result.error == "connection refused"
    assert time.monotonic() - start < 0.5


async def test_no_tcp_in_time_is_offline_when_the_host_is_not_known_up(
    loopback_host: str,
) -> None:
    # A real kernel listener that never accepts, its queue filled: SYNs are dropped, so connect
    # times out. A prober told that a live host proves nothing (the scan's setting), and with no
    # memory of this endpoint being busy, must call that offline — after its timeout, not later.
    listener = socket.socket()
    listener.bind((loopback_host, 0))
    listener.listen(0)
    ep = Endpoint(loopback_host, listener.getsockname()[1])
    fillers = []
    try:
        # The first connection completes (connect returns once it sits in the accept queue) and
        # fills the queue; the SYNs after it are dropped, as the probe's will be.
        fillers.append(socket.create_connection((ep.host, ep.port), timeout=5))
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((ep.host, ep.port))
            fillers.append(s)
        start = time.monotonic()
        result = await Prober(timeout=0.3, host_up_means_busy=False).probe(ep)
        elapsed = time.monotonic() - start
        assert result.status is Status.OFFLINE, result
        assert result.error == "no TCP connection within 0.3s"
        assert 0.25 < elapsed < 0.3 + 0.25
        # The same prober, once it has seen the endpoint busy, keeps calling it busy.
        prober = Prober(timeout=0.3, host_up_means_busy=False)
        prober.remember_busy(ep)
        assert (await prober.probe(ep)).status is Status.BUSY
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_busy_backend_stays_busy_however_often_probed_and_survives(
    rpc_server: StartRpc,
) -> None:
    ep, child = await rpc_server()
    holder = hold(ep)
    try:
        results = []
        for _ in range(10):  # a fresh Prober each time: separate `corral probe` runs
            start = time.monotonic()
            results.append(await Prober(timeout=BUSY_TIMEOUT).probe(ep))
            assert time.monotonic() - start < BUSY_TIMEOUT + 0.25
        assert [r.status for r in results] == [Status.BUSY] * 10, results
        errors = {r.error for r in results}
        # Both ways of being busy happened: HELLO unanswered while the queue had room, then the
        # queue full (the abandoned probes fill it) and connects timing out — still busy.
        assert "connected, HELLO not answered" in errors
        assert any(e and "accept queue full" in e for e in errors), errors
        assert child.returncode is None
    finally:
        holder.close()  # its HELLO was answered: an orderly close is safe for the holder
    # The server now works through the probes' queued connections (reset, so it writes nothing
    # into them) and is free again: alive, and ready.
    await wait_status(ep, Status.READY, seconds=10)
    assert child.returncode is None


async def test_busy_by_host_name_stays_busy_when_the_queue_is_full(
    rpc_server: StartRpc,
) -> None:
    # `localhost` resolves to 127.0.0.1: a named endpoint must not turn offline either.
    ep, child = await rpc_server(host="127.0.0.1")
    named = Endpoint("localhost", ep.port)
    holder = hold(ep)
    try:
        results = [await Prober(timeout=BUSY_TIMEOUT).probe(named) for _ in range(4)]
        assert [r.status for r in results] == [Status.BUSY] * 4, results
        assert any(r.error and "accept queue full" in r.error for r in results)
    finally:
        holder.close()
    await wait_status(ep, Status.READY, seconds=10)
    assert child.returncode is None


async def test_normal_close_of_an_abandoned_hello_kills_the_server_but_the_probe_does_not(
    rpc_server: StartRpc,
) -> None:
    """The SIGPIPE trap, shown both ways on two real servers held busy the same way.

    Control: a client that sends HELLO, gives up and closes normally; when the server gets to
    it, it writes the reply into a closed socket and dies (-13, SIGPIPE). Corral's probe gives up
    the same way but resets the connection: that server lives on and answers `ready`.
    """
    naive_ep, naive_child = await rpc_server()
    probed_ep, probed_child = await rpc_server()
    naive_holder, probed_holder = hold(naive_ep), hold(probed_ep)
    try:
        naive = socket.create_connection((naive_ep.host, naive_ep.port), timeout=2)
        naive.sendall(p.encode_hello())
        naive.settimeout(BUSY_TIMEOUT)
        with pytest.raises(TimeoutError):
            naive.recv(1)
        naive.close()  # orderly: FIN, our HELLO left behind in the queue
        for _ in range(2):
            result = await Prober(timeout=BUSY_TIMEOUT).probe(probed_ep)
            assert result.status is Status.BUSY
    finally:
        naive_holder.close()
        probed_holder.close()
    assert await wait_exit(naive_child, 5) == -13, (
        "the control no longer dies of SIGPIPE: check llama-rpc-facts.md against this build"
    )
    await wait_status(probed_ep, Status.READY, seconds=10)
    assert await wait_exit(probed_child, 0.5) is None
    assert probed_child.returncode is None


@pytest.mark.llama
async def test_backend_held_by_a_real_llama_server(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    ep, child = await rpc_server()
    async with running_llama_server(llama_bins, tiny_model, tmp_path, rpc_flag=[ep]):
        results = [await Prober(timeout=BUSY_TIMEOUT).probe(ep) for _ in range(10)]
        assert [r.status for r in results] == [Status.BUSY] * 10, results
        assert child.returncode is None
    # llama-server stopped (by PID): the backend outlived every probe and is free again.
    await wait_status(ep, Status.READY, seconds=10)
    assert child.returncode is None
