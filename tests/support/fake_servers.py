"""Small asyncio TCP fake servers, for faults a real ggml-rpc-server cannot be made to show.

Why fakes at all: a real ggml-rpc-server always speaks protocol 7.0.0 correctly, and the only
misbehaviour it can be pushed into for real (busy, SIGPIPE) is tested against the real binary in
test_probe_real.py. What a probe meets on a LAN besides that — a service that greets with a
banner, an HTTP server, junk, a server that closes at once or accepts and never talks, a reply cut
short or too long, another protocol version (8.0.0, 7.1.0), an old protocol-3 server that wants an
empty HELLO — can only come from a program written to misbehave. These fakes are that program;
each is a few lines, named for the one fault it shows.

Every fake listens on its own loopback address (never anything else), serves any number of
connections, records what each connection received, and is torn down with every connection it
still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from corral.endpoint import Endpoint
from corral.rpc import protocol as p
from tests.support.loopback import next_loopback
from tests.support.waiting import until

HELLO_REQUEST_SIZE = 1 + 8 + p.CONN_CAPS_SIZE


@dataclass
class Conn:
    """One accepted connection, with the small verbs a fault script needs."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    sent_at: list[float] = field(default_factory=list)  # monotonic time of every send
    # How the client ended the connection, as far as this server saw it: "eof" (orderly close),
    # "reset" (RST), or None (still open, or the server ended it first).
    ended: str | None = None

    async def recv_exactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.received += data
        return data

    async def recv_until(self, marker: bytes) -> bytes:
        data = await self.reader.readuntil(marker)
        self.received += data
        return data

    async def drain_forever(self) -> None:
        """Read and keep everything until the client goes (a server that never answers).

        A reset by the client raises ConnectionResetError, which the server records.
        """
        while chunk := await self.reader.read(65536):
            self.received += chunk
        self.ended = "eof"

    async def send(self, data: bytes) -> None:
        self.sent_at.append(time.monotonic())
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def close(self) -> None:
        """Orderly close (FIN)."""
        self.writer.close()

    def reset(self) -> None:
        """Abortive close (RST): what the kernel sends when a server closes with unread input."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Conn], Awaitable[None]]


@dataclass
class FakeServer:
    endpoint: Endpoint
    conns: list[Conn]
    handlers: set[asyncio.Task[None]] = field(default_factory=set)  # one per connection

    @property
    def accepted(self) -> int:
        return len(self.conns)

    async def settled(self, seconds: float = 5.0) -> None:
        """Until every connection's script has finished: once the client went, the fake has
        seen how (`Conn.ended`). Bounded, so a script that never ends fails the test."""
        pending = [t for t in self.handlers if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=seconds)
            assert not still, f"{len(still)} connection(s) to {self.endpoint} never ended"

    async def accepted_before_ours(self, seconds: float = 5.0) -> int:
        """Open a connection of our own and wait until the server accepts it; return how many
        it accepted before ours. The listener accepts in order, so this is a barrier: whatever
        a client started connecting before now has been counted once this returns."""
        _, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        ours = writer.get_extra_info("sockname")

        def peers() -> list[object]:
            return [c.writer.get_extra_info("peername") for c in self.conns]

        try:
            await until(lambda: ours in peers(), seconds, f"{self.endpoint} accepting us")
            return peers().index(ours)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def fake_server(script: Script, host: str | None = None) -> AsyncIterator[FakeServer]:
    """Serve `script` on a fresh loopback address; on exit, drop every connection."""
    host = host or next_loopback()
    conns: list[Conn] = []
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(conn)
        except ConnectionResetError:
            conn.ended = "reset"
        except asyncio.IncompleteReadError as exc:
            conn.received += exc.partial
            conn.ended = "eof"
        except (ConnectionError, asyncio.LimitOverrunError):
            pass  # the client left: that is its right
        finally:
            conn.writer.transport.abort()

    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield FakeServer(Endpoint(host, port), conns, tasks)
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        for task in list(tasks):
            with contextlib.suppress(BaseException):
                await task
        await server.wait_closed()


# --- well-formed replies ---------------------------------------------------------------------


def reply(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + payload


def hello_reply(version: tuple[int, int, int] = (7, 0, 0)) -> bytes:
    return reply(bytes(version) + b"\x00" + bytes(p.CONN_CAPS_SIZE))


def device_count_reply(count: int) -> bytes:
    return reply(struct.pack("<I", count))


def device_memory_reply(free: int, total: int) -> bytes:
    return reply(struct.pack("<QQ", free, total))


def conversation(version: tuple[int, int, int], devices: Sequence[tuple[int, int]]) -> bytes:
    """Every byte a correct server sends to a probe that asks HELLO, count, then each memory."""
    out = hello_reply(version) + device_count_reply(len(devices))
    for free, total in devices:
        out += device_memory_reply(free, total)
    return out


# --- the scripts -------------------------------------------------------------------------------


def rpc(
    version: tuple[int, int, int] = (7, 0, 0),
    devices: Sequence[tuple[int, int]] = ((1 << 30, 2 << 30),),
) -> Script:
    """A protocol-correct RPC server speaking `version`: for versions a real build cannot show."""

    async def script(c: Conn) -> None:
        cmd, size = struct.unpack("<BQ", await c.recv_exactly(9))
        if cmd != p.Command.HELLO or size != p.CONN_CAPS_SIZE:
            return  # like ggml-rpc-server: drop a client that does not start with HELLO
        await c.recv_exactly(size)
        await c.send(hello_reply(version))
        while True:
            cmd, size = struct.unpack("<BQ", await c.recv_exactly(9))
            payload = await c.recv_exactly(size)
            if cmd == p.Command.DEVICE_COUNT:
                await c.send(device_count_reply(len(devices)))
            elif cmd == p.Command.GET_DEVICE_MEMORY:
                (index,) = struct.unpack("<I", payload)
                if index >= len(devices):
                    return
                await c.send(device_memory_reply(*devices[index]))
            else:
                return

    return script


def legacy(version: tuple[int, int, int] = (3, 0, 0), reset: bool = True) -> Script:
    """An old (protocol 2-3) server: HELLO has an empty payload and a 3-byte reply.

    Given a HELLO whose size is not 0 it closes at once without reading the payload; the kernel
    turns that close into a reset (unread input). `reset=False` closes orderly instead.
    """

    async def script(c: Conn) -> None:
        cmd, size = struct.unpack("<BQ", await c.recv_exactly(9))
        if cmd != p.Command.HELLO or size != 0:
            if reset:
                c.reset()
            else:
                c.close()
            return
        await c.send(reply(bytes(version)))
        await c.drain_forever()

    return script


def banner(text: bytes) -> Script:
    """Greets first (SSH, SMTP, FTP style), then waits for the client."""

    async def script(c: Conn) -> None:
        await c.send(text)
        await c.drain_forever()

    return script


def http_line_server() -> Script:
    """Like llama-server's and Python's HTTP servers: silent until a line ends, then 400."""

    async def script(c: Conn) -> None:
        await c.recv_until(b"\n")
        await c.send(
            b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 11\r\n\r\n"
            b"Bad Request"
        )
        c.close()

    return script


def http_eager_server() -> Script:
    """Like nginx: rejects a request whose first byte cannot start a method, at once."""

    async def script(c: Conn) -> None:
        await c.recv_exactly(1)
        await c.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        c.close()

    return script


def junk_after_hello(data: bytes) -> Script:
    async def script(c: Conn) -> None:
        await c.recv_exactly(HELLO_REQUEST_SIZE)
        await c.send(data)
        await c.drain_forever()

    return script


def instant_close(reset: bool = False) -> Script:
    async def script(c: Conn) -> None:
        if reset:
            c.reset()
        else:
            c.close()

    return script


def silent() -> Script:
    """Accepts and reads, never answers: from outside, what a busy backend looks like."""

    async def script(c: Conn) -> None:
        await c.drain_forever()

    return script


def partial_reply(n: int, then_close: bool) -> Script:
    """Sends the first `n` bytes of a correct HELLO reply, then closes or goes silent."""

    async def script(c: Conn) -> None:
        await c.recv_exactly(HELLO_REQUEST_SIZE)
        await c.send(hello_reply()[:n])
        if then_close:
            c.close()
        else:
            await c.drain_forever()

    return script


def oversized_hello(size: int, stream: int = 64 * 1024) -> Script:
    """A HELLO reply whose size field claims `size` bytes, followed by `stream` bytes."""

    async def script(c: Conn) -> None:
        await c.recv_exactly(HELLO_REQUEST_SIZE)
        await c.send(struct.pack("<Q", size) + bytes(stream))
        await c.drain_forever()

    return script


def scripted(chunks: Sequence[tuple[float, bytes]], end: str) -> Script:
    """Sends each (delay, bytes) chunk regardless of input, then ends with fin, rst or hold."""

    async def script(c: Conn) -> None:
        drain = asyncio.ensure_future(c.drain_forever())
        try:
            for delay, data in chunks:
                if delay:
                    await asyncio.sleep(delay)
                await c.send(data)
            if end == "fin":
                c.close()
            elif end == "rst":
                c.reset()
            else:
                await drain
        finally:
            drain.cancel()
            with contextlib.suppress(BaseException):
                await drain

    return script
