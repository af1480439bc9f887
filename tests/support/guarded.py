"""What the guard and node-bound tests need beyond tests/support/dashboard.py.

- `serving_app`: the real app from `create_app(store, **options)` (any option: clocks, caps) on
  a real uvicorn socket on loopback, over a real EmbeddedStore.
- `raw_exchange`: one HTTP/1.1 request written byte for byte on a socket (duplicate headers,
  malformed Host, a body streamed on after the answer) and the answer as read, or how the
  connection ended when there was none.
- `Upstream`: a stand-in llama-server for `/v1` forwarding that records each request it got.
- `beat`: a heartbeat body for node `n`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from corral.store.sqlite import EmbeddedStore
from corral.web.app import create_app
from corral.web.server import serve
from tests.support.dashboard import TOKEN


@dataclass
class Served:
    app: FastAPI
    store: EmbeddedStore
    host: str
    port: int

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


@asynccontextmanager
async def serving_app(tmp_path: Path, **options: Any) -> AsyncIterator[Served]:
    """create_app(store, token=TOKEN, **options) served on 127.0.0.1 until the block ends."""
    store = await EmbeddedStore.open(tmp_path / "state.db")
    app = create_app(store, **{"token": TOKEN, **options})
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(app, "127.0.0.1", 0, stop=stop, on_ready=ready.set_result, handle_signals=False)
    )
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 10)
        yield Served(app, store, "127.0.0.1", port)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await store.close()


@dataclass
class RawReply:
    status: int | None  # None: no answer was read
    headers: dict[str, str]
    body: bytes
    ended: str  # "answered", or how the connection ended without an answer ("reset", "eof")
    write_error: str | None = None  # the body could not all be sent (the server closed)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


async def raw_exchange(
    host: str,
    port: int,
    head: bytes,
    body: Iterable[bytes] = (),
    *,
    read_first: bool = False,
    seconds: float = 30.0,
) -> RawReply:
    """Write `head` (request line and headers, CRLF CRLF included) and then `body`'s chunks,
    and read the answer until the server closes. `read_first`: read the answer before sending
    any body (for `Expect: 100-continue`)."""
    reader, writer = await asyncio.open_connection(host, port)
    write_error = None
    try:
        writer.write(head)
        await writer.drain()
        if not read_first:
            try:
                for chunk in body:
                    writer.write(chunk)
                    await writer.drain()
            except (ConnectionResetError, BrokenPipeError) as exc:
                write_error = type(exc).__name__
        try:
            raw = await asyncio.wait_for(reader.read(), seconds)
        except ConnectionResetError:
            return RawReply(None, {}, b"", "reset", write_error)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not raw:
        return RawReply(None, {}, b"", "eof", write_error)
    head_out, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_out.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawReply(int(lines[0].split(" ", 2)[1]), headers, payload, "answered", write_error)


def request_head(
    method: str, path: str, headers: Iterable[tuple[str, str]], *, close: bool = True
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunks(total: int, size: int = 64 * 1024) -> Iterable[bytes]:
    """`total` bytes of filler in `size` pieces, made as they are sent (never held whole)."""
    piece = b"x" * size
    while total > 0:
        yield piece[: min(size, total)]
        total -= size


async def achunks(total: int, size: int = 64 * 1024) -> AsyncIterable[bytes]:
    """chunks() for httpx's AsyncClient: sent chunked, with no Content-Length."""
    for piece in chunks(total, size):
        yield piece


@dataclass
class Seen:
    method: str
    path: str
    body_bytes: int


@dataclass
class Upstream:
    """A stand-in llama-server: answers every request `{"data": [...]}` and records it."""

    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            got = 0
            while got < length:
                data = await reader.read(min(length - got, 1 << 20))
                if not data:
                    break
                got += len(data)
            self.seen.append(Seen(method, path, got))
            body = b'{"object":"list","data":[{"id":"tiny"}]}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def beat(n: int | str, *, endpoint: str | None = None, heartbeat_s: float = 2.0) -> dict[str, Any]:
    """A valid heartbeat body for node `n` (its backend on 127.0.0.200:<1000+n> unless given)."""
    port = 1000 + n if isinstance(n, int) else 50052
    return {
        "node_id": f"n{n}",
        "endpoint": endpoint or f"127.0.0.200:{port}",
        "hostname": "box",
        "status": "ready",
        "heartbeat_s": heartbeat_s,
        "last_heartbeat": time.time(),
    }
