"""Run the dashboard app on uvicorn inside the caller's event loop.

It survives running out of file descriptors:

- `raise_fd_limit()` (called by the CLI at start) lifts the soft RLIMIT_NOFILE to the hard one;
- at most `max_connections` connections are open at once (by default a share of the soft limit
  that leaves the probes, the store and llama-server's links their descriptors): past it, the
  oldest idle connection (no request in progress) is closed to make room, and when none is idle
  the newcomer gets a 503 and is closed. So idle connections cannot exhaust the descriptors,
  and a fresh client is still answered while hundreds sit idle;
- identical log records (asyncio's "socket.accept() out of system resource", uvicorn's
  "Exceeded concurrency limit.") pass once, then as one "repeated N times" line at most every
  REPEAT_EVERY_S, never one line per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from corral.rpc.probe import open_limit
from corral.web.security import check_bind

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_CONNECTIONS = 4096  # the dashboard's ceiling, however many descriptors there are
MIN_CONNECTIONS = 64
FD_LIMIT_MOST = 1 << 20  # raise_fd_limit goes no higher
REPEAT_EVERY_S = 10.0
# The loggers an event storm floods: asyncio's accept loop and uvicorn's own.
STORM_LOGGERS = ("asyncio", "uvicorn.error")
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 33\r\nconnection: close\r\n\r\ntoo many connections; try again\r\n"
)


def raise_fd_limit(most: int = FD_LIMIT_MOST) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (at most `most`: children
    inherit it, and some close every descriptor up to it at start); return (soft, hard) after.
    A limit the kernel refuses is left as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def connection_cap(soft: int | None = None) -> int:
    """Pure given `soft` (the RLIMIT_NOFILE soft limit): the dashboard's connections at once,
    half of what the probes (rpc.probe.open_limit) leave, within MIN/MAX_CONNECTIONS."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, (soft - open_limit(soft)) // 2))


class RepeatFilter(logging.Filter):
    """Identical records (logger, level, message, exception type): the first passes; the rest
    are counted, and one of them passes as "(repeated N times in S s)", without its traceback,
    at most every `every_s`. `flush()` says what is still counted."""

    def __init__(
        self, every_s: float = REPEAT_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.every_s = every_s
        self._clock = clock
        # key -> [repeats not yet said, when it was last said]; oldest first, bounded
        self._seen: dict[tuple[str, int, str, str], list[float]] = {}
        self._targets: list[logging.Logger] = []

    @staticmethod
    def _key(record: logging.LogRecord) -> tuple[str, int, str, str]:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        return record.name, record.levelno, record.getMessage()[:500], exc

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            key = self._key(record)
        except Exception:  # a record that cannot be formatted: its handler will say so
            return True
        now = self._clock()
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [0, now]
            while len(self._seen) > 256:
                del self._seen[next(iter(self._seen))]
            return True
        entry[0] += 1
        if now - entry[1] < self.every_s:
            return False
        repeats, since = int(entry[0]), now - entry[1]
        entry[0], entry[1] = 0, now
        first_line = record.getMessage().split("\n", 1)[0]
        record.msg = "%s (repeated %d times in %.0f s)"
        record.args = (first_line, repeats, since)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True

    def flush(self) -> None:
        """Say, once, how often each record was repeated since it was last said."""
        pending = [(key, int(entry[0])) for key, entry in self._seen.items() if entry[0]]
        self._seen.clear()
        for (name, level, message, _), repeats in pending:
            first_line = message.split("\n", 1)[0]
            logging.getLogger(name).log(level, "%s (repeated %d times)", first_line, repeats)

    def attach(self, names: tuple[str, ...] = STORM_LOGGERS) -> None:
        for name in names:
            logger = logging.getLogger(name)
            logger.addFilter(self)
            self._targets.append(logger)

    def detach(self) -> None:
        for logger in self._targets:
            logger.removeFilter(self)
        self._targets.clear()
        self.flush()


@dataclass
class ConnectionGuard:
    """At most `cap` connections open: the oldest idle one makes room for a newcomer; with
    none idle the newcomer is refused (503, closed)."""

    cap: int
    open: dict[HttpToolsProtocol, None] = field(default_factory=dict)  # oldest first
    shed: int = 0
    refused: int = 0

    @staticmethod
    def idle(conn: HttpToolsProtocol) -> bool:
        cycle = conn.cycle
        return (cycle is None or cycle.response_complete) and not conn.pipeline

    def admit(self, conn: HttpToolsProtocol) -> None:
        self.open[conn] = None
        if len(self.open) <= self.cap:
            return
        victim = next((c for c in self.open if c is not conn and self.idle(c)), None)
        if victim is not None:
            del self.open[victim]
            self.shed += 1
            victim.transport.close()
            return
        del self.open[conn]
        self.refused += 1
        conn.transport.write(_REFUSED)
        conn.transport.close()

    def forget(self, conn: HttpToolsProtocol) -> None:
        self.open.pop(conn, None)


def guarded_protocol(guard: ConnectionGuard) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol, every connection admitted by `guard`."""

    class Guarded(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            guard.admit(self)

        def connection_lost(self, exc: Exception | None) -> None:
            guard.forget(self)
            super().connection_lost(exc)

    return Guarded


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
            ctx.logs.close()  # the log followers too: open streams would hold up the exit
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
    max_connections: int | None = None,
) -> None:
    """Serve `app` (from create_app) until `stop` is set, a signal arrives, or cancellation.

    Raises InsecureBindError before binding when `host` is not loopback, the app has no token
    and `insecure` is False; OSError when the address cannot be bound. `port=0` picks a free
    port; `on_ready(port)` is called once the app has started and accepts connections.
    With `handle_signals=True` (uvicorn's way) SIGINT/SIGTERM stop the server gracefully and
    are raised again afterwards; pass False when the caller handles signals and sets `stop`.
    `max_connections` (default: `connection_cap()`) bounds the connections open at once.
    """
    ctx = getattr(app.state, "corral", None)
    check_bind(host, ctx.token if ctx is not None else None, insecure)
    sock = bind_socket(host, port)
    bound_port = int(sock.getsockname()[1])
    guard = ConnectionGuard(max_connections if max_connections is not None else connection_cap())
    config = uvicorn.Config(
        app,
        log_level=log_level,
        # uvicorn's records go to the root logger like Corral's own, in the format the command
        # set (text, or JSON with --log-format json), not in uvicorn's own handler and format.
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
        server_header=False,
        proxy_headers=False,
        # Also how many connections asyncio accepts per wake-up before the guard sees any: kept
        # near the cap, so a burst cannot take the descriptors before the guard sheds it.
        backlog=max(128, min(2048, guard.cap // 2)),
        http=guarded_protocol(guard),
        # The guard bounds connections (uvicorn's check would count the newcomer itself and
        # refuse what the guard admitted); this bounds the requests running at once.
        limit_concurrency=guard.cap + 1,
    )
    server = _Server(config, app, handle_signals)
    repeats = RepeatFilter()
    repeats.attach()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            await task  # raises what made it stop
            raise RuntimeError(f"dashboard on {host}:{bound_port} stopped while starting")
        # Everything built so far (FastAPI's routes, pydantic's validators, the modules) lives
        # as long as the process: out of the collector's sight, a full collection no longer
        # walks it (each one held the event loop ~45 ms, the API's p99 under load).
        gc.freeze()
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
        repeats.detach()
        if guard.shed or guard.refused:
            log.warning(
                "dashboard: %d idle connections closed and %d refused to stay within %d",
                guard.shed,
                guard.refused,
                guard.cap,
            )
