"""Probe one endpoint over the ggml RPC protocol and give it exactly one status.

A probe must never harm what it probes (see ../shared/llama-rpc-facts.md):
- a ggml-rpc-server serves one client at a time; while a coordinator holds it, our HELLO sits in
  its queue unanswered. If we then closed normally, the server would later write its reply into a
  closed socket and die of SIGPIPE. So every connection we give up on is closed with an abortive
  close (SO_LINGER 0, which sends RST): that did not kill it.
- abandoned connections stay in the server's accept queue (backlog 1), so after two probes a busy
  server drops further SYNs and every connect times out, exactly like a dead host. A timed-out
  connect to a host that is known to be up (our own address, or a complete ARP entry), or to an
  endpoint this prober saw busy a moment ago, is therefore `busy`, never `offline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

from corral.endpoint import Endpoint
from corral.model import Device, ProbeResult, Status
from corral.net.neighbours import host_is_up
from corral.rpc import protocol as p

# How long a "busy" sighting lets a later connect timeout still count as busy.
BUSY_MEMORY_S = 300.0


class _NotRpc(Exception):
    pass


@dataclass
class Prober:
    timeout: float = 1.0
    client_major: int = p.CLIENT_PROTO_MAJOR
    client_minor: int = p.CLIENT_PROTO_MINOR
    # For a named endpoint a timed-out connect to a live host means a full accept queue. A scan
    # of a whole LAN must not call every firewalled host "busy", so it turns this off and relies
    # on having seen the endpoint busy before.
    host_up_means_busy: bool = True
    # Endpoints a coordinator holds: never connect to them (they serve one client, and queued
    # connections only delay that client). Shared with whoever knows the coordinator's set.
    held: set[Endpoint] = field(default_factory=set)
    # Endpoint -> monotonic time it was last seen busy. Per prober, not global.
    _busy_seen: dict[Endpoint, float] = field(default_factory=dict)
    # At most one probe of an endpoint at a time: a second caller joins the first.
    _inflight: dict[Endpoint, asyncio.Task[ProbeResult]] = field(default_factory=dict)

    async def probe(self, endpoint: Endpoint) -> ProbeResult:
        if endpoint in self.held:
            return ProbeResult(
                endpoint, Status.BUSY, error="in use by the coordinator (not probed)"
            )
        task = self._inflight.get(endpoint)
        if task is None:
            task = asyncio.ensure_future(self._probe(endpoint))
            self._inflight[endpoint] = task
            task.add_done_callback(lambda _: self._inflight.pop(endpoint, None))
        return await asyncio.shield(task)

    async def _probe(self, endpoint: Endpoint) -> ProbeResult:
        start = time.monotonic()
        deadline = start + self.timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port), self.timeout
            )
        except ConnectionRefusedError:
            return ProbeResult(endpoint, Status.OFFLINE, error="connection refused")
        except TimeoutError:
            return await self._connect_timed_out(endpoint)
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            return ProbeResult(endpoint, Status.OFFLINE, error=f"unreachable: {reason}")
        try:
            return await self._converse(endpoint, reader, writer, start, deadline)
        finally:
            if not writer.is_closing():
                _abort(writer)

    def remember_busy(self, endpoint: Endpoint) -> None:
        """Seed the memory from elsewhere (the store's last known view)."""
        self._busy_seen[endpoint] = time.monotonic()

    async def _connect_timed_out(self, endpoint: Endpoint) -> ProbeResult:
        seen = self._busy_seen.get(endpoint)
        remembered = seen is not None and time.monotonic() - seen < BUSY_MEMORY_S
        if (
            endpoint.is_ip
            and (remembered or self.host_up_means_busy)
            and await asyncio.to_thread(host_is_up, endpoint.host)
        ):
            return ProbeResult(
                endpoint,
                Status.BUSY,
                error="host is up but connect timed out: accept queue full (held by a client)",
            )
        return ProbeResult(
            endpoint, Status.OFFLINE, error=f"no TCP connection within {self.timeout:g}s"
        )

    async def _converse(
        self,
        endpoint: Endpoint,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        start: float,
        deadline: float,
    ) -> ProbeResult:
        writer.write(p.encode_hello())
        try:
            header = await _read(reader, p.SIZE_FIELD, deadline)
        except TimeoutError:
            # Accepted but unanswered: a coordinator holds it. RST so our queued HELLO is harmless.
            _abort(writer)
            self._busy_seen[endpoint] = time.monotonic()
            return ProbeResult(endpoint, Status.BUSY, error="connected, HELLO not answered")
        except _NotRpc as exc:
            _abort(writer)
            if str(exc) == "closed":
                return await self._maybe_legacy(endpoint, deadline)
            return ProbeResult(endpoint, Status.NOT_RPC, error=str(exc))
        self._busy_seen.pop(endpoint, None)
        try:
            p.decode_size(header, p.HELLO_REPLY_SIZE, "HELLO")
            version = p.decode_hello(await _read(reader, p.HELLO_REPLY_SIZE, deadline))
        except (p.ProtocolError, _NotRpc, TimeoutError) as exc:
            _abort(writer)
            return ProbeResult(endpoint, Status.NOT_RPC, error=_short(exc))
        latency_ms = (time.monotonic() - start) * 1000.0
        if not p.is_compatible(version, self.client_major, self.client_minor):
            _abort(writer)
            return ProbeResult(
                endpoint,
                Status.INCOMPATIBLE,
                version=str(version),
                latency_ms=latency_ms,
                error=f"protocol {version}, this llama-server speaks "
                f"{self.client_major}.{self.client_minor}.x",
            )
        try:
            devices = await _query_devices(reader, writer, deadline)
        except (p.ProtocolError, _NotRpc, TimeoutError, OSError) as exc:
            _abort(writer)
            return ProbeResult(
                endpoint,
                Status.NOT_RPC,
                version=str(version),
                error=f"HELLO answered, device query failed: {_short(exc)}",
            )
        # Every request answered, nothing queued: a normal close is safe and lets the server
        # move on to its next client at once.
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return ProbeResult(
            endpoint,
            Status.READY,
            version=str(version),
            devices=tuple(devices),
            latency_ms=latency_ms,
        )

    async def _maybe_legacy(self, endpoint: Endpoint, deadline: float) -> ProbeResult:
        """A server that closes on our 24-byte HELLO may be an old (protocol 2-3) RPC server.

        Old servers expect an empty HELLO and reply with 3 bytes; ask once more in that dialect.
        """
        not_rpc = ProbeResult(
            endpoint, Status.NOT_RPC, error="closed the connection without answering HELLO"
        )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return not_rpc
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port), remaining
            )
        except (OSError, TimeoutError):
            return not_rpc
        try:
            writer.write(p.encode_legacy_hello())
            header = await _read(reader, p.SIZE_FIELD, deadline)
            p.decode_size(header, p.LEGACY_HELLO_REPLY_SIZE, "legacy HELLO")
            version = p.decode_legacy_hello(await _read(reader, 3, deadline))
        except (p.ProtocolError, _NotRpc, TimeoutError, OSError):
            return not_rpc
        finally:
            _abort(writer)
        return ProbeResult(
            endpoint,
            Status.INCOMPATIBLE,
            version=str(version),
            error=f"old RPC protocol {version}, this llama-server speaks {self.client_major}.x",
        )


async def _query_devices(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float
) -> list[Device]:
    writer.write(p.encode_device_count())
    p.decode_size(await _read(reader, p.SIZE_FIELD, deadline), 4, "DEVICE_COUNT")
    count = p.decode_device_count(await _read(reader, 4, deadline))
    devices = []
    for index in range(count):
        writer.write(p.encode_get_device_memory(index))
        p.decode_size(await _read(reader, p.SIZE_FIELD, deadline), 16, "GET_DEVICE_MEMORY")
        free, total = p.decode_device_memory(await _read(reader, 16, deadline))
        devices.append(Device(index, free, total))
    return devices


async def _read(reader: asyncio.StreamReader, n: int, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    try:
        return await asyncio.wait_for(reader.readexactly(n), remaining)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise _NotRpc("closed") from None
        raise _NotRpc(f"reply cut short after {len(exc.partial)} bytes") from None
    except (ConnectionResetError, BrokenPipeError):
        raise _NotRpc("connection reset") from None


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): anything we sent and abandon can never SIGPIPE the server."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _short(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "reply not complete in time"
    return str(exc) or exc.__class__.__name__
