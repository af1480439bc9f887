"""Run a real coordinator (real llama-server, real store) inside a test, and talk to it.

`running()` runs the coordinator's Runner as a task of the test's own event loop, over a real
EmbeddedStore; `Running` reads what it published (record, events) and waits for it, always with
a bound. `chat`/`stream`/`health` speak to the llama-server it runs.
"""

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
from corral.coordinator.policy import Action, Observation, PolicyConfig
from corral.coordinator.publish import Publisher
from corral.coordinator.runner import Runner, Timings
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.server import ServerOptions
from corral.llama.split import parse_tensor_split
from corral.rpc.held import HeldBackends
from corral.rpc.probe import Prober
from corral.store.base import CoordinatorRecord, Event, EventKind
from corral.store.sqlite import EmbeddedStore
from tests.support.loopback import free_port
from tests.support.waiting import until

FAST = Timings(
    tick_s=0.05,
    probe_every_s=0.1,
    stall_timeout_s=20.0,
    drain_timeout_s=10.0,
    stop_grace_s=3.0,
    failover_grace_s=0.5,
)


@dataclass
class ObservedRunner(Runner):
    """The real Runner, keeping a record of what it saw and did, in its own (monotonic) clock:

    - `looks`: how many times it has observed and decided;
    - `ready_log`: at each look, (when, the ready backends it does not hold -> ready since);
    - `stops`: each stop, with the requests llama-server had in flight when it began.
    """

    looks: int = field(default=0, init=False)
    ready_log: list[tuple[float, dict[Endpoint, float]]] = field(default_factory=list, init=False)
    stops: list[tuple[Action, int | None]] = field(default_factory=list, init=False)

    async def _observe(self) -> Observation:
        obs = await super()._observe()
        self.looks += 1
        self.ready_log.append((obs.now, dict(self.memory.ready_since)))
        return obs

    async def _stop(self, action: Action) -> None:
        in_flight = await self._http.in_flight() if self.server is not None else None
        self.stops.append((action, in_flight))
        await super()._stop(action)

    def ready_runs(self, ep: Endpoint) -> list[tuple[float, float]]:
        """Each unbroken run of `ep` being ready (and not held), as (since, last seen ready)."""
        runs: dict[float, float] = {}
        for now, since in self.ready_log:
            if ep in since:
                runs[since[ep]] = now
        return sorted(runs.items())


@dataclass
class Running:
    runner: ObservedRunner
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
        last: list[CoordinatorRecord | None] = [None]

        async def serving() -> bool:
            if self.task.done():
                self.task.result()  # surface the coordinator's crash
                raise AssertionError("coordinator stopped")
            rec = last[0] = await self.store.coordinator()
            return (
                rec is not None
                and rec.state == "serving"
                and set(rec.backends) == want
                and rec.pid != other_than
                and await health(self.url) == 200
            )

        try:
            await until(serving, seconds, f"serving with {sorted(want)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last record {last[0]}; {self.said}") from None
        assert last[0] is not None
        return last[0]

    async def wait_event(
        self,
        kind: EventKind,
        seconds: float = 10.0,
        where: Callable[[Event], bool] = lambda e: True,
    ) -> Event:
        """The latest event of `kind` (that `where` accepts), once the coordinator wrote one.

        Reading the store once right after an action races the coordinator's own write; this
        waits for it, and fails saying which event never came."""
        found: list[Event] = []

        async def written() -> bool:
            found[:] = [e for e in await self.events(kind) if where(e)]
            return bool(found)

        try:
            await until(written, seconds, f"a {kind} event")
        except AssertionError as exc:
            seen = [(e.kind, e.message) for e in await self.events()]
            raise AssertionError(f"{exc}; events so far: {seen}") from None
        return found[-1]

    async def looks_pass(self, n: int, seconds: float = 10.0) -> None:
        """Until the coordinator has looked (observed and decided) `n` more times: a window
        measured in its own steps, not in seconds."""
        target = self.runner.looks + n
        await until(lambda: self.runner.looks >= target, seconds, f"{n} coordinator looks")

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
    clock: Callable[[], float] = time.time,
    load_clock: Callable[[], float] = time.monotonic,
    **policy: Any,
) -> AsyncIterator[Running]:
    """A coordinator running as a task; on exit it is stopped and every llama-server it ran is
    checked gone, by PID. `clock` is the store's (node registrations expire by it);
    `load_clock` the runner's, by which a model load stalls."""
    policy.setdefault("debounce_s", 1.0)
    store = await EmbeddedStore.open(tmp_path / f"state-{time.monotonic_ns()}.db", clock=clock)
    said: list[str] = []
    warned: list[str] = []
    port = port or free_port("127.0.0.1")
    held = HeldBackends()
    runner = ObservedRunner(
        opts=ServerOptions(
            port=port, parallel=parallel, tensor_split=parse_tensor_split(tensor_split)
        ),
        model=model,
        llama_server=bins.llama_server,
        candidates=Candidates(tuple(backends), store, Prober(timeout=1.0, held=held)),
        publish=Publisher(store, port, said.append, warned.append),
        log_path=tmp_path / f"llama-server-{port}.log",
        policy=PolicyConfig(**policy),
        timings=timings,
        held=held,
        clock=load_clock,
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
