"""Run the dashboard app on uvicorn inside the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from corral.web.security import check_bind

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class _Server(uvicorn.Server):
    """uvicorn, with open event streams ended at shutdown (they would hold it up) and signal
    handling optional (off when the caller has its own)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, handle_signals: bool) -> None:
        super().__init__(config)
        self._app = app
        self._handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if self._handle_signals:
            with super().capture_signals():
                yield
        else:
            yield

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.begin_exit()
        super().handle_exit(sig, frame)

    def begin_exit(self) -> None:
        ctx = getattr(self._app.state, "corral", None)
        if ctx is not None:
            ctx.live.close_streams()
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen, raising OSError with the address in the message (uvicorn would exit)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


async def serve(
    app: FastAPI,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    insecure: bool = False,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
    handle_signals: bool = True,
    log_level: str = "warning",
) -> None:
    """Serve `app` (from create_app) until `stop` is set, a signal arrives, or cancellation.

    Raises InsecureBindError before binding when `host` is not loopback, the app has no token
    and `insecure` is False; OSError when the address cannot be bound. `port=0` picks a free
    port; `on_ready(port)` is called once the app has started and accepts connections.
    With `handle_signals=True` (uvicorn's way) SIGINT/SIGTERM stop the server gracefully and
    are raised again afterwards; pass False when the caller handles signals and sets `stop`.
    """
    ctx = getattr(app.state, "corral", None)
    check_bind(host, ctx.token if ctx is not None else None, insecure)
    sock = bind_socket(host, port)
    bound_port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
        server_header=False,
        proxy_headers=False,
        backlog=2048,
    )
    server = _Server(config, app, handle_signals)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            await task  # raises what made it stop
            raise RuntimeError(f"dashboard on {host}:{bound_port} stopped while starting")
        if on_ready is not None:
            on_ready(bound_port)
        if stop is None:
            await task
            return
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not task.done():
            server.begin_exit()
        await task
    except asyncio.CancelledError:
        server.begin_exit()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        raise
    finally:
        sock.close()
