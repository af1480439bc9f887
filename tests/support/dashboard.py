"""What the dashboard tests run the dashboard with.

- `running_dashboard`: the real app on a real uvicorn socket on loopback, over a real
  EmbeddedStore.
- `ProbeLoop`: a stand-in for the monitor that writes real probe results (corral.rpc.probe.Prober
  against real ggml-rpc-servers) into the store, and a status-change event with each change.
- `LlamaController`: a real llama-server (the tiny model, `--rpc` to real backends, `-ngl 99`)
  behind the dashboard's CoordinatorControl shape, publishing its record to the store.
- `sse_events`: reads a server-sent event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.supervisor import Child
from corral.rpc.probe import Prober
from corral.store.base import BackendRecord, CoordinatorRecord, Event, EventKind
from corral.store.sqlite import EmbeddedStore
from corral.types import CoordinatorState, SourceName, Status
from corral.web.app import create_app
from corral.web.control import CoordinatorControl, CoordinatorStatus, Rescan
from corral.web.server import serve
from tests.support.loopback import free_port
from tests.support.waiting import until

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Dashboard:
    app: FastAPI
    store: EmbeddedStore
    base: str
    rescans: list[float]


@asynccontextmanager
async def running_dashboard(
    tmp_path: Path,
    *,
    token: str | None = TOKEN,
    coordinator: CoordinatorControl | None = None,
    coordinator_url: str | None = None,
    store: EmbeddedStore | None = None,
    with_rescan: bool = True,
    refresh_s: float = 1.0,
    max_body_bytes: int = 64 * 1024,
    coordinator_log: Path | None = None,
) -> AsyncIterator[Dashboard]:
    own_store = store is None
    if store is None:
        store = await EmbeddedStore.open(tmp_path / "state.db")
    rescans: list[float] = []

    async def rescan() -> None:
        rescans.append(time.time())

    rescan_cb: Rescan | None = rescan if with_rescan else None
    app = create_app(
        store,
        rescan=rescan_cb,
        coordinator=coordinator,
        coordinator_url=coordinator_url,
        token=token,
        refresh_s=refresh_s,
        max_body_bytes=max_body_bytes,
        coordinator_log=coordinator_log,
    )
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(app, "127.0.0.1", 0, stop=stop, on_ready=ready.set_result, handle_signals=False)
    )
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 10)
        yield Dashboard(app, store, f"http://127.0.0.1:{port}", rescans)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        if own_store:
            await store.close()


@dataclass
class ProbeLoop:
    """The monitor's job in miniature: probe, write the results, note status changes."""

    store: EmbeddedStore
    endpoints: list[Endpoint]
    interval_s: float = 0.2
    prober: Prober = field(default_factory=lambda: Prober(timeout=0.5))
    _last: dict[Endpoint, BackendRecord] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    async def once(self) -> None:
        results = await asyncio.gather(*(self.prober.probe(ep) for ep in self.endpoints))
        now = time.time()
        records = []
        events = []
        for r in results:
            before = self._last.get(r.endpoint)
            seen = now if r.status is not Status.OFFLINE else (before.last_seen if before else 0.0)
            rec = BackendRecord(
                r.endpoint,
                r.status,
                r.version,
                r.devices,
                (SourceName.FILE,),
                r.latency_ms,
                r.error,
                last_seen=seen,
            )
            if before is None or before.status is not r.status:
                old = before.status if before else "unknown"
                events.append(
                    Event(
                        EventKind.BACKEND_STATUS,
                        f"{r.endpoint}: {old} -> {r.status}",
                        r.endpoint,
                        data={"status": str(r.status)},
                    )
                )
            self._last[r.endpoint] = rec
            records.append(rec)
        await self.store.put_backends(records)
        for ev in events:
            await self.store.add_event(ev)

    async def _run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> ProbeLoop:
        await self.once()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class LlamaController:
    """A real llama-server as the dashboard's coordinator controller."""

    binaries: LlamaBinaries
    model: Path
    backends: Sequence[Endpoint]
    log_dir: Path
    store: EmbeddedStore
    host: str = "127.0.0.1"
    port: int = 0
    restarts: int = 0
    last_reason: str | None = None
    child: Child | None = None
    started_at: float | None = None
    state: CoordinatorState = CoordinatorState.STOPPED

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self.port = free_port(self.host)
        argv = [
            str(self.binaries.llama_server),
            "-m",
            str(self.model),
            "--rpc",
            ",".join(str(ep) for ep in self.backends),
            "-ngl",
            "99",
            "-c",
            "512",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        self.state = CoordinatorState.STARTING
        child = self.child = Child(argv, self.log_dir / f"llama-server-{self.port}.log")
        await child.start()
        async with httpx.AsyncClient(trust_env=False) as client:

            async def ready() -> bool:
                if child.returncode is not None:
                    raise AssertionError(f"llama-server exited {child.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get(f"{self.base_url}/health")).status_code == 200
                return False

            try:
                await until(ready, 20, "llama-server /health 200")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {child.log_tail()}") from None
        self.state = CoordinatorState.SERVING
        self.started_at = time.time()
        await self.publish()

    async def publish(self) -> None:
        await self.store.set_coordinator(
            CoordinatorRecord(
                self.state,
                tuple(self.backends),
                self.child.pid if self.child else None,
                self.port,
                self.model.name,
                self.started_at,
                self.restarts,
                self.last_reason,
            )
        )

    async def restart(self, reason: str) -> None:
        self.state = CoordinatorState.RESTARTING
        self.last_reason = reason
        await self.publish()
        if self.child is not None:
            await self.child.stop(grace=3)
        self.restarts += 1
        await self.start()

    def status(self) -> CoordinatorStatus:
        return CoordinatorStatus(
            state=self.state,
            pid=self.child.pid if self.child else None,
            port=self.port,
            model=self.model.name,
            backends=tuple(self.backends),
            uptime_s=time.time() - self.started_at if self.started_at else None,
            restarts=self.restarts,
            last_reason=self.last_reason,
            tokens_per_second=None,
        )

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(grace=3)
        self.state = CoordinatorState.STOPPED


async def sse_events(client: httpx.AsyncClient, url: str) -> AsyncIterator[tuple[str, Any]]:
    """(event name, parsed data) for each message of a server-sent event stream."""
    async with client.stream("GET", url, timeout=httpx.Timeout(5, read=30)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = "message", ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "":
                if data:
                    yield name, json.loads(data)
                name, data = "message", ""
