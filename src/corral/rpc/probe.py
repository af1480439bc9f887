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

Silence after HELLO means "busy" only from an RPC server. Many HTTP servers (llama-server itself,
Python's http.server) are silent too: they wait for the end of a request line. So when half of the
remaining time has passed in silence, the probe sends an "HTTP nudge" (CRLF CRLF): an HTTP server
answers it at once (400 Bad Request) and is `not-rpc`; a busy RPC server never reads it (our
connection waits in its queue, and we reset it); an RPC server that answers HELLO only after the
nudge is `ready`, but would read the nudge as its next command, so its devices are not queried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import socket
import struct
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

from corral.endpoint import Endpoint
from corral.net.neighbours import host_is_up
from corral.rpc import protocol as p
from corral.types import Device, ProbeResult, Status

# How long a "busy" sighting lets a later connect timeout still count as busy.
BUSY_MEMORY_S = 300.0
# Sent after half the HELLO wait in silence: ends an HTTP request (see the module doc).
HTTP_NUDGE = b"\r\n\r\n"
# How long resolving a host name may add to a probe whose connect timed out.
RESOLVE_SLACK_S = 0.25
# How many of the first bytes a peer sent are quoted in a not-rpc error.
_PREVIEW = 12


class _Closed(Exception):
    """The peer closed (FIN) or reset the connection before a reply was complete."""

    def __init__(self, partial: int, reset: bool) -> None:
        super().__init__("reset" if reset else "closed")
        self.partial = partial
        self.reset = reset


class _Stream:
    """Reads exact sizes against a deadline, and remembers what arrived in total.

    Unlike StreamReader.readexactly under wait_for, a timeout here still tells how many bytes the
    peer sent: a silent peer may be a busy RPC server, one that sent a few bytes is not.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buf = bytearray()
        self.received = 0
        self.head = b""  # the first bytes the peer ever sent, for error messages

    async def exactly(self, n: int, until: float) -> bytes:
        while len(self._buf) < n:
            remaining = until - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                chunk = await asyncio.wait_for(self._reader.read(65536), remaining)
            except TimeoutError:  # a subclass of OSError: must come first
                raise
            except ConnectionError:
                raise _Closed(len(self._buf), reset=True) from None
            except OSError:  # e.g. EHOSTUNREACH on an established connection
                raise _Closed(len(self._buf), reset=True) from None
            if not chunk:
                raise _Closed(len(self._buf), reset=False)
            if len(self.head) < _PREVIEW:
                self.head += chunk[: _PREVIEW - len(self.head)]
            self._buf += chunk
            self.received += len(chunk)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _describe(head: bytes) -> str:
    if head.startswith(b"HTTP/"):
        return "an HTTP server, not an RPC backend"
    if head.startswith(b"SSH-"):
        return "an SSH server, not an RPC backend"
    return f"not an RPC reply: {head!r}"


_OUT_OF_FILES_RETRIES = 20
_OUT_OF_FILES_WAIT_S = 0.05
_FD_RESERVE = 128  # descriptors left for the store, the dashboard, llama-server's pipes


class _OutOfFiles(Exception):
    """The connect failed for want of a descriptor in this process."""


def open_limit(soft: int | None = None) -> int:
    """Pure given `soft` (the RLIMIT_NOFILE soft limit): how many probe connections at once."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    return max(16, min(1024, soft - _FD_RESERVE))


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
    # connections only delay that client). A read-only view; its owner writes it (rpc/held.py).
    held: AbstractSet[Endpoint] = field(default_factory=frozenset)
    # Endpoint -> monotonic time it was last seen busy. Per prober, not global.
    _busy_seen: dict[Endpoint, float] = field(default_factory=dict)
    # At most one probe of an endpoint at a time: a second caller joins the first.
    _inflight: dict[Endpoint, asyncio.Task[ProbeResult]] = field(default_factory=dict)
    # Connections open at once, below the process's descriptor limit: 20,000 probes at once
    # would run out of descriptors, and a probe must never report the prober's own shortage as
    # the backend's status. A probe's time starts once it has a slot.
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(open_limit()))

    def derived(self, timeout: float, host_up_means_busy: bool) -> Prober:
        """A prober with other timings that shares this one's memory: the held set, what was
        busy moments ago (a full accept queue must not turn a busy backend offline in the next
        scan), and probes in flight (one connection per endpoint at a time)."""
        other = replace(self, timeout=timeout, host_up_means_busy=host_up_means_busy)
        other.held = self.held
        other._busy_seen = self._busy_seen
        other._inflight = self._inflight
        other._slots = self._slots
        return other

    def reading(self, held: AbstractSet[Endpoint]) -> Prober:
        """This prober (same timings and memory) told what is held through `held`, a view whose
        owner (the runner, or a monitor keeping it from the store) writes it."""
        return replace(self, held=held)

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
        async with self._slots:
            for _ in range(_OUT_OF_FILES_RETRIES):
                try:
                    return await self._probe_once(endpoint)
                except _OutOfFiles:
                    await asyncio.sleep(_OUT_OF_FILES_WAIT_S)  # others close theirs meanwhile
            return ProbeResult(
                endpoint,
                Status.OFFLINE,
                error="not probed: this process is out of file descriptors",
            )

    async def _probe_once(self, endpoint: Endpoint) -> ProbeResult:
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
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _OutOfFiles from None  # ours, not the backend's: try again
            reason = exc.strerror or exc.__class__.__name__
            return ProbeResult(endpoint, Status.OFFLINE, error=f"unreachable: {reason}")
        except UnicodeError:
            return ProbeResult(endpoint, Status.OFFLINE, error="host name cannot be resolved")
        try:
            return await self._converse(endpoint, reader, writer, start, deadline)
        except OSError as exc:  # last resort: a probe reports, it never raises
            return ProbeResult(endpoint, Status.OFFLINE, error=f"connection lost: {exc}")
        finally:
            if not writer.is_closing():
                _abort(writer)

    def remember_busy(self, endpoint: Endpoint) -> None:
        """Seed the memory from elsewhere (the store's last known view)."""
        self._busy_seen[endpoint] = time.monotonic()

    async def _connect_timed_out(self, endpoint: Endpoint) -> ProbeResult:
        seen = self._busy_seen.get(endpoint)
        remembered = seen is not None and time.monotonic() - seen < BUSY_MEMORY_S
        if (remembered or self.host_up_means_busy) and await self._host_up(endpoint):
            self._busy_seen[endpoint] = time.monotonic()
            return ProbeResult(
                endpoint,
                Status.BUSY,
                error="host is up but connect timed out: accept queue full (held by a client)",
            )
        return ProbeResult(
            endpoint, Status.OFFLINE, error=f"no TCP connection within {self.timeout:g}s"
        )

    async def _host_up(self, endpoint: Endpoint) -> bool:
        """Is the host itself up? A host name is resolved first (briefly: `localhost` is common)."""
        if endpoint.is_ip:
            addresses = {endpoint.host}
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM),
                    RESOLVE_SLACK_S,
                )
            except (OSError, TimeoutError, UnicodeError):
                return False
            addresses = {str(info[4][0]) for info in infos}
        return await asyncio.to_thread(lambda: any(host_is_up(a) for a in addresses))

    async def _converse(
        self,
        endpoint: Endpoint,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        start: float,
        deadline: float,
    ) -> ProbeResult:
        stream = _Stream(reader)
        writer.write(p.encode_hello())
        connected = time.monotonic()
        nudge_at = connected + (deadline - connected) / 2
        nudged = False
        try:
            try:
                header = await stream.exactly(p.SIZE_FIELD, nudge_at)
            except TimeoutError:
                if stream.received:  # a few bytes, then silence: no RPC server does that
                    raise
                writer.write(HTTP_NUDGE)
                nudged = True
                header = await stream.exactly(p.SIZE_FIELD, deadline)
        except TimeoutError:
            _abort(writer)
            if stream.received:
                return ProbeResult(
                    endpoint,
                    Status.NOT_RPC,
                    error=f"sent {stream.received} bytes, then nothing: {_describe(stream.head)}",
                )
            # Accepted but unanswered: a coordinator holds it. RST so our queued HELLO is harmless.
            self._busy_seen[endpoint] = time.monotonic()
            return ProbeResult(endpoint, Status.BUSY, error="connected, HELLO not answered")
        except _Closed as exc:
            _abort(writer)
            if exc.partial:
                return ProbeResult(
                    endpoint,
                    Status.NOT_RPC,
                    error=f"reply cut short after {exc.partial} bytes: {_describe(stream.head)}",
                )
            if nudged:
                return ProbeResult(
                    endpoint, Status.NOT_RPC, error="closed the connection without answering HELLO"
                )
            # Closed (FIN) or reset at once: an old RPC server refuses our HELLO's size that way.
            return await self._maybe_legacy(endpoint, deadline)
        try:
            p.decode_size(header, p.HELLO_REPLY_SIZE, "HELLO")
        except p.ProtocolError:
            _abort(writer)
            return ProbeResult(endpoint, Status.NOT_RPC, error=_describe(stream.head))
        try:
            version = p.decode_hello(await stream.exactly(p.HELLO_REPLY_SIZE, deadline))
        except (p.ProtocolError, _Closed, TimeoutError) as exc:
            _abort(writer)
            return ProbeResult(endpoint, Status.NOT_RPC, error=f"HELLO reply: {_short(exc)}")
        self._busy_seen.pop(endpoint, None)
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
        if nudged:
            # It answered, so it is free now; but it will read our nudge as its next command, so
            # ask nothing more. RST: it is waiting to read, never writing.
            _abort(writer)
            return ProbeResult(
                endpoint,
                Status.READY,
                version=str(version),
                latency_ms=latency_ms,
                error="answered HELLO late; devices not queried",
            )
        try:
            devices = await _query_devices(stream, writer, deadline)
        except (p.ProtocolError, _Closed, TimeoutError) as exc:
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
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), max(0.05, deadline - time.monotonic()))
        return ProbeResult(
            endpoint,
            Status.READY,
            version=str(version),
            devices=tuple(devices),
            latency_ms=latency_ms,
        )

    async def _maybe_legacy(self, endpoint: Endpoint, deadline: float) -> ProbeResult:
        """A server that closes on our 24-byte HELLO may be an old (protocol 2-3) RPC server.

        Old servers expect an empty HELLO (they read the size, see it is not 0, and close — with
        our payload unread, so the close is a reset) and reply with 3 bytes; ask once more in
        that dialect.
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
            stream = _Stream(reader)
            writer.write(p.encode_legacy_hello())
            header = await stream.exactly(p.SIZE_FIELD, deadline)
            p.decode_size(header, p.LEGACY_HELLO_REPLY_SIZE, "legacy HELLO")
            version = p.decode_legacy_hello(
                await stream.exactly(p.LEGACY_HELLO_REPLY_SIZE, deadline)
            )
        except (p.ProtocolError, _Closed, TimeoutError, OSError):
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
    stream: _Stream, writer: asyncio.StreamWriter, deadline: float
) -> list[Device]:
    writer.write(p.encode_device_count())
    p.decode_size(await stream.exactly(p.SIZE_FIELD, deadline), 4, "DEVICE_COUNT")
    count = p.decode_device_count(await stream.exactly(4, deadline))
    devices = []
    for index in range(count):
        writer.write(p.encode_get_device_memory(index))
        p.decode_size(await stream.exactly(p.SIZE_FIELD, deadline), 16, "GET_DEVICE_MEMORY")
        free, total = p.decode_device_memory(await stream.exactly(16, deadline))
        devices.append(Device(index, free, total))
    return devices


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
    if isinstance(exc, _Closed):
        what = "reset" if exc.reset else "closed"
        return f"connection {what} after {exc.partial} bytes of a reply"
    return str(exc) or exc.__class__.__name__
