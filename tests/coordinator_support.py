"""Run a real coordinator (real llama-server, real store) inside a test, and talk to it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from corral.coordinator.candidates import Candidates
from corral.coordinator.policy import PolicyConfig
from corral.coordinator.publish import Publisher
from corral.coordinator.runner import Runner, Timings
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.server import ServerOptions
from corral.llama.split import parse_tensor_split
from corral.rpc.probe import Prober
from corral.store.base import CoordinatorRecord, Event, EventKind
from corral.store.sqlite import EmbeddedStore
from tests.conftest import free_port

FAST = Timings(
    tick_s=0.05,
    probe_every_s=0.1,
    start_timeout_s=20.0,
    drain_timeout_s=10.0,
    stop_grace_s=3.0,
    failover_grace_s=0.5,
)


@dataclass
class Running:
    runner: Runner
    store: EmbeddedStore
    task: asyncio.Task[None]
    stop: asyncio.Event
    said: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.runner.opts.base_url

    async def record(self) -> CoordinatorRecord:
        rec = await self.store.coordinator()
        assert rec is not None
        return rec

    async def events(self, *kinds: EventKind) -> list[Event]:
        return [e for e in await self.store.events(1000) if not kinds or e.kind in kinds]

    async def restarts(self) -> int:
        return len(await self.events(EventKind.COORDINATOR_RESTARTED))

    async def wait_serving(
        self, backends: Iterable[Endpoint], seconds: float = 15.0, other_than: int | None = None
    ) -> CoordinatorRecord:
        """Until the record says serving with exactly `backends` (and /health is ready)."""
        want = set(backends)
        rec: CoordinatorRecord | None = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.task.done():
                self.task.result()  # surface the coordinator's crash
                raise AssertionError("coordinator stopped")
            rec = await self.store.coordinator()
            if (
                rec is not None
                and rec.state == "serving"
                and set(rec.backends) == want
                and rec.pid != other_than
                and await health(self.url) == 200
            ):
                return rec
            await asyncio.sleep(0.05)
        raise AssertionError(f"never served with {sorted(want)}; last record {rec}; {self.said}")

    async def pids(self) -> set[int]:
        """Every llama-server pid this coordinator started or adopted."""
        kinds = (EventKind.COORDINATOR_STARTED, EventKind.COORDINATOR_RESTARTED)
        return {int(e.data["pid"]) for e in await self.events(*kinds) if e.data.get("pid")}


@asynccontextmanager
async def running(
    tmp_path: Path,
    bins: LlamaBinaries,
    model: Path | None,
    backends: Iterable[Endpoint],
    *,
    port: int | None = None,
    timings: Timings = FAST,
    tensor_split: str | None = "1,1",
    parallel: int | None = 1,
    **policy: Any,
) -> AsyncIterator[Running]:
    """A coordinator running as a task; on exit it is stopped and every llama-server it ran is
    checked gone, by PID."""
    policy.setdefault("debounce_s", 1.0)
    store = await EmbeddedStore.open(tmp_path / f"state-{time.monotonic_ns()}.db")
    said: list[str] = []
    warned: list[str] = []
    port = port or free_port("127.0.0.1")
    runner = Runner(
        opts=ServerOptions(
            port=port, parallel=parallel, tensor_split=parse_tensor_split(tensor_split)
        ),
        model=model,
        llama_server=bins.llama_server,
        candidates=Candidates(tuple(backends), store, Prober(timeout=1.0)),
        publish=Publisher(store, port, said.append, warned.append),
        log_path=tmp_path / f"llama-server-{port}.log",
        policy=PolicyConfig(**policy),
        timings=timings,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    c = Running(runner, store, task, stop, said, warned)
    try:
        yield c
    finally:
        pids = await c.pids()
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
        finally:
            await store.close()
        left = [p for p in pids if _alive(p)]
        assert not left, f"llama-server still running after stop: {left}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _client(timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=timeout, trust_env=False)


async def health(url: str) -> int | None:
    async with _client(1.0) as client:
        try:
            return (await client.get(url + "/health")).status_code
        except httpx.HTTPError:
            return None


async def chat(url: str, max_tokens: int = 8, seconds: float = 10.0) -> dict[str, Any]:
    """One chat completion; raises on any failure."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    async with _client(seconds) as client:
        reply = await client.post(url + "/v1/chat/completions", json=body)
    reply.raise_for_status()
    data: dict[str, Any] = reply.json()
    assert data["choices"][0]["message"]["content"] is not None
    return data


@dataclass
class StreamResult:
    chunks: int = 0
    finished: bool = False  # saw a finish_reason: the answer is complete
    error: str | None = None
    ended_at: float = 0.0


async def stream(
    url: str, max_tokens: int, on_first: Callable[[], None] | None = None, seconds: float = 10.0
) -> StreamResult:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    out = StreamResult()
    try:
        async with (
            _client(seconds) as client,
            client.stream("POST", url + "/v1/chat/completions", json=body) as reply,
        ):
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                out.chunks += 1
                if out.chunks == 1 and on_first:
                    on_first()
                if choice.get("finish_reason"):
                    out.finished = True
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    if not out.finished and out.error is None:
        out.error = "stream ended without a finish_reason"
    out.ended_at = time.monotonic()
    return out


async def until(check: Callable[[], Any], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")
