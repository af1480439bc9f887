"""The control plane stops when told and survives running out of descriptors.

- SIGTERM ends `corral dashboard` and `corral up` within 10 s, whatever their backends file
  (a FIFO here, which used to hang discovery, and the process with it, for good);
- a part that will not stop (a discovery source that ignores its cancellation) is cancelled
  and left behind within a bound: run_plane returns;
- the dashboard keeps answering a fresh client while more idle connections than it allows (and
  more than its descriptor limit) sit open, and its log stays a few lines long.

Real processes and sockets on loopback; every process stopped here was started here, by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import select
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.plane import plane as plane_module
from corral.plane.plane import CANCEL_S, STOP_S, PlaneConfig, WatchPlan, run_plane
from corral.rpc.probe import Prober
from corral.sources.base import Source, SourceReport
from corral.sources.chain import ChainOptions
from corral.store.sqlite import EmbeddedStore
from corral.types import SourceName
from corral.web.app import create_app
from corral.web.server import RepeatFilter, connection_cap, serve
from tests.support.corral_cli import corral_script, isolated_env
from tests.support.loopback import free_port
from tests.support.waiting import until

TOKEN = "shutdown-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIGTERM_BOUND_S = 10.0


# ---- corral dashboard / corral up as processes -----------------------------------------------


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    base: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=5, trust_env=False)

    async def answers(self) -> bool:
        if self.proc.returncode is not None:
            raise AssertionError(f"exited {self.proc.returncode}:\n{self.output()[-3000:]}")
        try:
            async with self.client() as c:
                return (await c.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def sigterm_ends_it(self) -> float:
        """SIGTERM by PID; the seconds it took to exit (fails past SIGTERM_BOUND_S)."""
        self.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            code = await asyncio.wait_for(self.proc.wait(), SIGTERM_BOUND_S)
        except TimeoutError:
            raise AssertionError(
                f"still running {SIGTERM_BOUND_S:g} s after SIGTERM:\n{self.output()[-3000:]}"
            ) from None
        assert code == 0, self.output()[-3000:]
        return time.monotonic() - start


@asynccontextmanager
async def corral_plane(
    tmp_path: Path, command: str, *args: str, nofile: int | None = None
) -> AsyncIterator[Running]:
    """`corral <command> --port P <args>` with its own state, answering /healthz; killed by PID
    at the end if it is still running. `nofile`: its descriptor limit, soft and hard."""
    port = free_port("127.0.0.1")
    env = isolated_env(tmp_path / "xdg")
    env["CORRAL_TOKEN"] = TOKEN
    log = tmp_path / f"{command}-{port}.out"

    def limits() -> None:  # in the child, before exec
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            corral_script(),
            command,
            "--port",
            str(port),
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=limits,
        )
    running = Running(proc, f"http://127.0.0.1:{port}", log)
    try:
        await until(running.answers, 30, f"corral {command} answering /healthz")
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()  # the process this test started, by its PID
            await proc.wait()


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "rpc_backends.conf"
    os.mkfifo(path)
    return path


async def test_dashboard_with_a_fifo_backends_file_still_discovers_and_stops_on_sigterm(
    tmp_path: Path, fifo: Path
) -> None:
    """The FIFO used to block the file source's read, and with it every discovery run (no node
    ever showed) and the exit (SIGTERM ignored: the read's thread held the interpreter)."""
    args = ["--sources", "file,registry", "--backends-file", str(fifo)]
    async with corral_plane(tmp_path, "dashboard", *args) as dash:
        nothing = free_port("127.0.0.1")  # nothing listens there: the backend reads offline
        beat = {
            "node_id": "n1",
            "endpoint": f"127.0.0.1:{nothing}",
            "hostname": "n1",
            "status": "ready",
            "heartbeat_s": 30,
        }
        async with dash.client() as c:
            reply = await c.post("/api/nodes/heartbeat", json=beat, headers=AUTH)
        assert reply.status_code == 200, reply.text

        async def listed() -> bool:
            async with dash.client() as c:
                backends = (await c.get("/api/rpc_backends")).json()
            return any(b["port"] == nothing and "registry" in b["sources"] for b in backends)

        await until(listed, 20, "the registered node's backend on the dashboard")
        await dash.sigterm_ends_it()


async def test_up_with_a_fifo_backends_file_stops_on_sigterm(tmp_path: Path, fifo: Path) -> None:
    args = ["--sources", "file", "--backends-file", str(fifo)]
    async with corral_plane(tmp_path, "up", *args) as up:
        await up.sigterm_ends_it()


# ---- a part that will not stop ---------------------------------------------------------------


@dataclass
class Stubborn:
    """A discovery source that never answers and swallows every cancellation until released
    (then it ends as cancelled)."""

    started: asyncio.Event
    release: asyncio.Event
    swallowed: int = 0
    name: SourceName = SourceName.FILE

    async def collect(self) -> SourceReport:
        self.started.set()
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.swallowed += 1
        raise asyncio.CancelledError


async def test_run_plane_returns_although_a_source_ignores_its_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Stubborn(asyncio.Event(), asyncio.Event())

    def chain(*_: Any) -> list[Source]:
        return [source]

    monkeypatch.setattr(plane_module, "build_chain", chain)
    cfg = PlaneConfig(
        state=tmp_path / "state",
        watch=WatchPlan([SourceName.FILE], ChainOptions()),
        port=0,
        environ={},
    )
    stop = asyncio.Event()
    said: list[str] = []
    plane = asyncio.create_task(
        run_plane(cfg, Prober(timeout=0.5), stop, say=said.append, warn=said.append)
    )
    try:
        await asyncio.wait_for(source.started.wait(), 20)
        stop.set()
        start = time.monotonic()
        bound = STOP_S + CANCEL_S + 5
        try:
            await asyncio.wait_for(asyncio.shield(plane), bound)
        except TimeoutError:
            raise AssertionError(f"run_plane still running {bound:g} s after stop") from None
        assert time.monotonic() - start < bound
        assert source.swallowed >= 1  # it was cancelled, and ignored it
    finally:
        source.release.set()
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(plane, 60)


# ---- descriptors -----------------------------------------------------------------------------


def test_connection_cap_leaves_room_for_probes_and_the_rest() -> None:
    assert connection_cap(256) == 64  # the floor
    assert connection_cap(1024) == 64
    assert connection_cap(8192) == (8192 - 1024) // 2
    assert connection_cap(1 << 20) == 4096  # the ceiling


def test_repeated_records_pass_once_then_as_a_count_at_most_every_10_s() -> None:
    now = [0.0]
    repeats = RepeatFilter(every_s=10.0, clock=lambda: now[0])
    logger = logging.getLogger("test_shutdown.storm")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage() + (" +traceback" if record.exc_info else ""))

    def accept_failed() -> None:  # as asyncio's accept loop logs it
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.exception("socket.accept() out of system resource\nsocket: <fd=6>")

    handler = Collect()
    logger.addHandler(handler)
    logger.propagate = False
    repeats.attach((logger.name,))
    try:
        for _ in range(100_000):
            accept_failed()
            now[0] += 1e-4  # 100,000 in 10 s
        logger.warning("something else")  # another record: its own count
        now[0] = 10.01  # 10 s since the first was said: the count is said, this one included
        accept_failed()
        now[0] = 10.02  # one more: held back, then said when the filter is detached
        accept_failed()
    finally:
        repeats.detach()
        logger.removeHandler(handler)
        logger.propagate = True
    assert lines == [
        "socket.accept() out of system resource\nsocket: <fd=6> +traceback",
        "something else",
        "socket.accept() out of system resource (repeated 100000 times in 10 s)",
        "socket.accept() out of system resource (repeated 1 times)",
    ]


@asynccontextmanager
async def dashboard(tmp_path: Path, max_connections: int) -> AsyncIterator[str]:
    store = await EmbeddedStore.open(tmp_path / "state.db")
    app = create_app(store, token=TOKEN)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            app,
            "127.0.0.1",
            0,
            stop=stop,
            on_ready=ready.set_result,
            handle_signals=False,
            max_connections=max_connections,
        )
    )
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 10)
        base = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as c:
                return (await c.get("/healthz")).status_code == 200

        await until(healthy, 10, "the dashboard's /healthz")
        yield base
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await store.close()


@contextlib.contextmanager
def idle_connections(base: str, count: int) -> Iterator[list[socket.socket]]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((host, int(port)))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has closed (EOF or reset waiting to be read)."""
    closed = 0
    for s in socks:
        readable, _, _ = select.select([s], [], [], 0)
        if not readable:
            continue
        try:
            if s.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except OSError:
            closed += 1
    return closed


@contextlib.contextmanager
def records_of(*names: str) -> Iterator[list[logging.LogRecord]]:
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record)

    handler = Catch()
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield caught
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


async def test_idle_connections_past_the_cap_are_shed_and_a_fresh_client_is_answered(
    tmp_path: Path,
) -> None:
    cap = 32
    with records_of("asyncio", "uvicorn.error", "corral.web.server") as records:
        async with dashboard(tmp_path, cap) as base:
            with idle_connections(base, cap + 200) as socks:
                await until(lambda: closed_by_server(socks) >= 200, 20, "200 idle ones shed")
                async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as c:
                    reply = await c.get("/healthz")
                assert reply.status_code == 200
                assert closed_by_server(socks) <= 200 + 1  # only what was needed (+ the last)
    shed = [r.getMessage() for r in records if "idle connections closed" in r.getMessage()]
    assert len(shed) == 1 and f"within {cap}" in shed[0]
    assert len(records) <= 3, [r.getMessage() for r in records]


async def test_with_every_connection_busy_a_newcomer_gets_503_not_a_descriptor(
    tmp_path: Path,
) -> None:
    cap = 3
    async with dashboard(tmp_path, cap) as base:
        streams: list[httpx.Response] = []
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(cap):  # three open event streams: requests in progress, not idle
                c = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=base, timeout=5, trust_env=False)
                )
                r = await stack.enter_async_context(c.stream("GET", "/api/stream"))
                assert r.status_code == 200
                streams.append(r)
            async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as c:
                try:
                    refused = await c.get("/healthz")
                    assert refused.status_code == 503
                    assert refused.text == "too many connections; try again\r\n"
                except httpx.RemoteProtocolError:
                    pass  # closed before the request was read: refused either way
        # The streams closed: room again.
        async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as c:
            await until(lambda: _ok(c), 10, "/healthz answered once the streams closed")


async def _ok(c: httpx.AsyncClient) -> bool:
    try:
        return (await c.get("/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


async def test_dashboard_at_its_descriptor_limit_keeps_answering_and_logs_little(
    tmp_path: Path,
) -> None:
    """`corral dashboard` with 256 descriptors in all (soft = hard, so raising the soft limit
    gains nothing) and 700 idle connections at it: it used to run out, log the same accept
    traceback hundreds of thousands of times and answer nobody."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        if hard != resource.RLIM_INFINITY and hard < 1024:
            pytest.skip(f"this test needs 1024 descriptors itself; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text("")
    args = ["--sources", "file", "--backends-file", str(conf)]
    async with corral_plane(tmp_path, "dashboard", *args, nofile=256) as dash:
        with idle_connections(dash.base, 700):
            # Answered while they are all still open (the oldest idle ones make room).
            await until(dash.answers, 20, "/healthz with 700 idle connections open")
            async with dash.client() as c:
                assert (await c.get("/api/rpc_backends")).status_code == 200
        await until(dash.answers, 10, "/healthz after the idle connections closed")
        await dash.sigterm_ends_it()
    lines = dash.output().splitlines()
    assert len(lines) < 40, "\n".join(lines[:60])
