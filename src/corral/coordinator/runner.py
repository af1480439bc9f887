"""The coordinator's loop: observe, ask the policy, act. All the I/O lives here.

Each tick it looks at
- its llama-server: exited (and how, from its log), /health, and the state of the TCP
  connections it holds to its backends (links.py) — a backend in use is never probed;
- the candidates it does not hold: a fresh probe each `probe_every_s`, at once after a stop;
- live node registrations: a held backend whose node stops its heartbeat is lost;
then hands that to policy.decide and carries out the answer: start (wait for /health ready),
stop (drain first when planned), or wait. A restart someone asks for (`request_restart`) is one
more input to the policy, taken at the next look.

What it holds it writes, as the one owner, into `held` (rpc/held.py) at the moment it starts or
stops holding it: a prober shared with a monitor must never connect to a backend llama-server
is taking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from corral.coordinator.candidates import Candidates, Round
from corral.coordinator.health import Health, NoAnswer, ServerHttp
from corral.coordinator.links import judge, not_listening, read_links, resolve
from corral.coordinator.load_reader import read_load_sample
from corral.coordinator.loading import LoadWatch, ProgressLines
from corral.coordinator.planning import Planner, planned_bytes, planned_options
from corral.coordinator.policy import (
    Action,
    Do,
    Exit,
    Memory,
    Observation,
    PolicyConfig,
    Serving,
    decide,
)
from corral.coordinator.process import AdoptedServer, OwnedServer, Supervised, find_on_port
from corral.coordinator.publish import Publisher
from corral.endpoint import Endpoint
from corral.llama.buffers import LOG_HEAD_BYTES, device_memory, parse_buffers
from corral.llama.server import ServerOptions, explain_log, server_argv, server_env
from corral.models.plan import Plan, Shortfall
from corral.rpc.held import HeldBackends
from corral.store.base import EventKind
from corral.types import CoordinatorState, DeviceMemory, DeviceRef, Status

log = logging.getLogger(__name__)

NODE_DOWN = frozenset({Status.OFFLINE, Status.NOT_RPC, Status.INCOMPATIBLE})


class CoordinatorError(RuntimeError):
    """The coordinator cannot do its job at all (bad model, port taken); the message says why."""


@dataclass(frozen=True, slots=True)
class Timings:
    tick_s: float = 0.2  # how often the llama-server and its links are looked at
    probe_every_s: float = 1.0  # fresh probes of the backends not held
    # Loading the model has no deadline: a start fails when nothing moves for this long.
    stall_timeout_s: float = 60.0
    progress_every_s: float = 0.5  # the record's loading progress, at most this often
    drain_timeout_s: float = 30.0  # planned restart: wait this long for requests in flight
    stop_grace_s: float = 5.0  # SIGTERM, then SIGKILL after this
    failover_grace_s: float = 1.0  # a broken llama-server gets less time


@dataclass
class Runner:
    opts: ServerOptions
    model: Path | None
    llama_server: Path
    candidates: Candidates
    publish: Publisher
    log_path: Path
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    timings: Timings = field(default_factory=Timings)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # The writer of what llama-server holds; the candidates' prober reads the same object.
    held: HeldBackends = field(kw_only=True)
    # What loading is judged by (tests drive it); the rest of the loop keeps time.monotonic.
    clock: Callable[[], float] = field(default=time.monotonic, kw_only=True)
    # Bytes planned for each device, published beside what llama-server's log says it used.
    planned: Mapping[DeviceRef, int] | None = field(default=None, kw_only=True)

    server: Supervised | None = field(default=None, init=False)
    plan: Plan | None = field(default=None, init=False)  # the memory plan of the last start
    load: LoadWatch | None = field(default=None, init=False)  # the load under way, if any
    memory: Memory = field(default_factory=Memory, init=False)
    _http: ServerHttp = field(init=False)
    _round: Round | None = field(default=None, init=False)
    _planner: Planner = field(default_factory=Planner, init=False)
    _round_at: float = field(default=float("-inf"), init=False)
    _pending_exit: Exit | None = field(default=None, init=False)
    _unhealthy_since: float | None = field(default=None, init=False)
    _addresses: dict[Endpoint, frozenset[str]] = field(default_factory=dict, init=False)
    _devices: dict[Endpoint, int] = field(default_factory=dict, init=False)  # from ready probes
    _linked: set[Endpoint] = field(default_factory=set, init=False)
    _node_seen: set[Endpoint] = field(default_factory=set, init=False)
    _reported: dict[Endpoint, Status] = field(default_factory=dict, init=False)
    _said_wait: str | None = field(default=None, init=False)
    _busy: bool = field(default=False, init=False)  # requests in flight at the last look
    _work_done: float = field(default=-1.0, init=False)
    _progress_at: float = field(default=0.0, init=False)
    _told_load_at: float = field(default=float("-inf"), init=False)
    _load_lines: ProgressLines = field(default_factory=ProgressLines, init=False)
    # Restart requests not yet seen by the policy, and the callers waiting for the start that
    # follows the ones it has seen (True: serving again; False: that start failed).
    _asked: list[str] = field(default_factory=list, init=False)
    _asked_waiters: list[asyncio.Future[bool]] = field(default_factory=list, init=False)
    _restart_waiters: list[asyncio.Future[bool]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._http = ServerHttp(self.opts.base_url)
        if self.candidates.prober.held is not self.held:
            raise ValueError("the runner must own the held set its candidates' prober reads")

    def request_restart(self, reason: str) -> asyncio.Future[bool]:
        """Ask for a planned restart. The future is True once llama-server serves again after
        it, False if that start failed; cancelled if the coordinator stops first."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asked.append(reason)
        self._asked_waiters.append(waiter)
        return waiter

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; always leaves nothing running behind."""
        loop = asyncio.create_task(self._loop())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({loop, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            try:
                for task in (loop, stopped):
                    task.cancel()
                await asyncio.gather(loop, stopped, return_exceptions=True)
            finally:
                await self._shutdown()
        error = None if loop.cancelled() else loop.exception()
        if error is not None:
            raise error

    # -- the loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        await self._adopt_or_check()
        while True:
            try:
                obs = await self._observe()
                action, self.memory = decide(self.policy, self.memory, obs)
                await self._act(action)
            except CoordinatorError:
                raise
            except Exception as exc:  # a supervisor that dies takes the service with it
                log.exception("coordinator: step failed")
                self.publish.warn(f"coordinator step failed ({exc!r}); carrying on")
                await asyncio.sleep(1.0)
                continue
            if action.do in (Do.NOTHING, Do.WAIT):
                await asyncio.sleep(self.timings.tick_s)

    async def _observe(self) -> Observation:
        exit_ = self._pending_exit
        self._pending_exit = None
        server = self.server
        if server is not None:
            how = await server.exited()
            if how is not None:
                exit_ = await self._exited(server, how)
                server = None
        held = frozenset(server.backends) if server else frozenset()
        fresh = await self._look(held)
        serving = None
        if server is not None:
            if fresh:  # a serving llama-server logs forever: its log is kept under a cap
                await asyncio.to_thread(server.trim_log)
            lost = await self._lost(server, fresh)
            unhealthy, stalled = await asyncio.gather(self._health(), self._progress(fresh))
            serving = Serving(held, server.started_at, lost, unhealthy, stalled)
        ready = self._round.ready - held if self._round else frozenset()
        # Taken only here: a start already under way when the request came does not answer it.
        requested = "; ".join(dict.fromkeys(self._asked)) or None
        self._restart_waiters += self._asked_waiters
        self._asked, self._asked_waiters = [], []
        return Observation(time.monotonic(), ready, serving, exit_, requested)

    async def _act(self, action: Action) -> None:
        if action.do is Do.WAIT:
            await self._wait(action.reason)
        elif action.do is Do.STOP:
            await self._stop(action)
        elif action.do is Do.START:
            await self._start(action)

    # -- observing ------------------------------------------------------------------------

    async def _look(self, held: frozenset[Endpoint]) -> bool:
        """Probe the candidates not held, when due. True if this tick brought fresh results."""
        now = time.monotonic()
        if now - self._round_at < self.timings.probe_every_s:
            return False
        also = self.memory.last_set or frozenset()
        self._round = await self.candidates.look(held, also)
        self._round_at = now
        for result in self._round.results.values():
            if result.status is Status.READY and result.devices:
                self._devices[result.endpoint] = len(result.devices)
        await self._report_statuses(self._round)
        return True

    async def _lost(self, server: Supervised, fresh: bool) -> dict[Endpoint, str]:
        lost: dict[Endpoint, str] = {}
        if server.pid is not None:
            links = await asyncio.to_thread(read_links, server.pid)
            if links is not None:
                lost.update(judge(links, self._addresses, self._linked))
        if fresh:  # these walk every socket on the machine: at the probe pace, not every tick
            silent = await asyncio.to_thread(not_listening, server.backends)
            lost.update({e: why for e, why in silent.items() if e not in lost})
        nodes = self._round.nodes if self._round else None
        if nodes is None:  # store unreadable: no news about heartbeats is not bad news
            return lost
        for ep in server.backends:
            node = nodes.get(ep)
            if node is not None:
                self._node_seen.add(ep)
                if node.status in NODE_DOWN and ep not in lost:
                    lost[ep] = f"its node reports it {node.status}"
            elif ep in self._node_seen and ep not in lost:
                lost[ep] = "its node stopped sending heartbeats"
        return lost

    async def _health(self) -> float | None:
        """Start of the current run of failed /health checks (None while healthy)."""
        if await self._http.health() is Health.READY:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = time.monotonic()
        return self._unhealthy_since

    async def _progress(self, fresh: bool) -> float | None:
        """Since when requests in flight have made no progress (None: idle, or progressing).

        /metrics is answered by llama-server's main loop, so a loop stuck in a read from a
        silent backend does not answer at all: no answer proves no progress."""
        if fresh:
            try:
                load = await self._http.load()
            except NoAnswer:
                self._busy = True  # the clock keeps running from the last progress seen
            else:
                if load is None or load.in_flight == 0 or load.work_done != self._work_done:
                    self._progress_at = time.monotonic()
                self._work_done = load.work_done if load else -1.0
                self._busy = load is not None and load.in_flight > 0
        return self._progress_at if self._busy else None

    async def _exited(self, server: Supervised, how: str) -> Exit:
        why = explain_log(await asyncio.to_thread(server.log_since_start))
        detail = f"{how}: {why}" if why else how
        self._forget(server)
        self.publish.warn(f"llama-server pid {server.pid} {detail}")
        await self.publish.event(
            EventKind.COORDINATOR_FAILED,
            f"llama-server pid {server.pid} {detail}",
            pid=server.pid,
            backends=[str(b) for b in server.backends],
        )
        await self.publish.state(CoordinatorState.RESTARTING, reason=f"llama-server {detail}")
        return Exit(frozenset(server.backends), server.started_at, detail)

    async def _report_statuses(self, found: Round) -> None:
        """Say once per change why a candidate is not used (incompatible ones by name)."""
        for ep, result in found.results.items():
            if self._reported.get(ep) is result.status:
                continue
            self._reported[ep] = result.status
            why = f": {result.error}" if result.error else ""
            if result.status in (Status.INCOMPATIBLE, Status.NOT_RPC):
                message = f"backend {ep} is {result.status}{why}; it will not be used"
                self.publish.warn(message)
                await self.publish.event(EventKind.WARNING, message, ep)
            elif result.status is Status.READY:
                self.publish.say(f"backend {ep} is ready")
            else:
                self.publish.say(f"backend {ep} is {result.status}{why}")

    # -- acting ---------------------------------------------------------------------------

    async def _wait(self, reason: str) -> None:
        if reason.split(":")[0] != (self._said_wait or "").split(":")[0]:
            self.publish.say(reason)
            await self.publish.state(CoordinatorState.WAITING, backends=(), reason=reason)
        self._said_wait = reason

    async def _start(self, action: Action) -> None:
        model = self.model
        if model is None:  # checked before the loop; this only keeps the type checker honest
            raise CoordinatorError("no model to start llama-server with")
        opts = await self._planned(model, action)
        if opts is None:
            return
        self._said_wait = None
        if action.warning:
            self.publish.warn(action.warning)
            await self.publish.event(EventKind.WARNING, action.warning)
        server = OwnedServer(
            server_argv(self.llama_server, model, opts, action.backends, self._devices),
            self.log_path,
            server_env(self.env),
            action.backends,
            str(model),
        )
        # Published before the start: the monitor must not probe what llama-server connects to.
        await self.publish.state(
            CoordinatorState.STARTING, backends=action.backends, reason=action.reason
        )
        self.server = server  # before start(): a cancel from here on still stops it
        self.held.hold(server.backends)
        try:
            await server.start()
        except OSError as exc:
            self.server = None
            self.held.release(server.backends)
            raise CoordinatorError(f"cannot start {self.llama_server}: {exc}") from None
        failed = await self._wait_ready(server)
        if failed is not None:
            await self._failed_start(server, failed)
            return
        await self._serving(server, action)

    async def _planned(self, model: Path, action: Action) -> ServerOptions | None:
        """The options for this start, from a memory plan; None when the plan says it would not
        fit: then the coordinator waits (state WAITING, the shortfall as its reason), and the
        next look plans again with every backend ready by then."""
        results = self._round.results if self._round else {}
        try:
            plan = await self._planner.plan(
                model, self.opts, action.backends, results, self.policy.when_short
            )
        except (OSError, ValueError) as exc:  # llama-server may still read it: let it try
            self.plan, self.planned = None, None
            self.publish.warn(f"no memory plan for {model} ({exc}); starting without one")
            return self.opts
        if isinstance(plan, Shortfall):
            self.memory = replace(self.memory, take_ready=True)
            await self._wait(plan.reason)
            await asyncio.sleep(self.timings.tick_s)  # a START not carried out: no busy loop
            return None
        self.plan = plan
        self.planned = planned_bytes(plan)
        return planned_options(self.opts, plan)

    async def _wait_ready(self, server: OwnedServer) -> str | None:
        """None once /health says ready; else why it never got there: it exited, or its load
        moved nothing for `stall_timeout_s` (no deadline: a big load over RPC takes minutes)."""
        watch = await self._watch_load(bool(server.backends))
        try:
            look = 0
            while True:
                how = await server.exited()
                if how is not None:
                    return f"{how} while loading the model"
                if await self._http.health() is Health.READY and await server.exited() is None:
                    return None
                # A sample walks every TCP socket of the machine (3 ms with 900): every 4th look.
                look += 1
                if look % 4 == 1:
                    await self._sample_load(watch, server.pid, server.log_path)
                    stalled = watch.stalled()
                    if stalled is not None:
                        return stalled
                    await self._tell_load(watch)
                await asyncio.sleep(0.05)
        finally:
            self.load = None

    async def _watch_load(self, remote: bool) -> LoadWatch:
        self._told_load_at, self._load_lines = float("-inf"), ProgressLines()
        self.load = LoadWatch(
            self.timings.stall_timeout_s, self.clock(), await self._bytes_to_send(), remote
        )
        return self.load

    async def _bytes_to_send(self) -> int | None:
        """The weights the plan puts on the backends (they cross the links at load); without
        a plan, the model file's size: an upper bound (token embeddings stay local)."""
        if self.plan is not None and self.plan.backends:
            return sum(d.weights for d in self.plan.backends)
        model = self.model
        if model is None:
            return None
        try:
            return (await asyncio.to_thread(model.stat)).st_size
        except OSError:
            return None

    async def _sample_load(self, watch: LoadWatch, pid: int | None, log: Path | None) -> None:
        """One look at the load, at the clock's now."""
        now = self.clock()
        watch.feed(await asyncio.to_thread(read_load_sample, pid, log, self.opts.port, now))

    async def _tell_load(self, watch: LoadWatch) -> None:
        """The record at most every `progress_every_s`; a line every 10 % or 5 s."""
        now = watch.seen_at
        if now - self._told_load_at < self.timings.progress_every_s:
            return
        self._told_load_at = now
        progress = watch.progress()
        text = progress.text()
        if self._load_lines.due(now, progress.percent):
            self.publish.say(text)
        await self.publish.state(CoordinatorState.STARTING, reason=text)

    async def _failed_start(self, server: OwnedServer, failed: str) -> None:
        await server.stop(self.timings.failover_grace_s)
        why = explain_log(await asyncio.to_thread(server.log_since_start))
        detail = f"{failed}: {why}" if why else failed
        self._forget(server)
        self._pending_exit = Exit(
            frozenset(server.backends), server.started_at, detail, while_loading=True
        )
        self._answer_restart(False)
        self.publish.warn(f"llama-server {detail} (log: {self.log_path})")
        await self.publish.event(
            EventKind.COORDINATOR_FAILED,
            f"llama-server {detail}",
            backends=[str(b) for b in server.backends],
            log=str(self.log_path),
        )
        await self.publish.state(
            CoordinatorState.FAILED, backends=(), reason=f"llama-server {detail}"
        )

    async def _serving(self, server: Supervised, action: Action) -> None:
        self._addresses = await asyncio.to_thread(resolve, server.backends)
        self._linked = set()
        self._unhealthy_since = None
        self._busy, self._work_done, self._progress_at = False, -1.0, time.monotonic()
        names = ",".join(map(str, action.backends)) or "local devices only"
        kind = EventKind.COORDINATOR_RESTARTED if action.restart else EventKind.COORDINATOR_STARTED
        verb = "adopted" if server.adopted else "restarted" if action.restart else "started"
        message = f"llama-server pid {server.pid} {verb} on {self.opts.base_url} with {names}"
        if action.restart:
            message += f" ({action.reason})"
        memory = await self._memory(server)
        self.publish.say(message)
        await self.publish.event(
            kind,
            message,
            pid=server.pid,
            backends=[str(b) for b in action.backends],
            reason=action.reason,
        )
        await self.publish.state(
            CoordinatorState.SERVING,
            backends=action.backends,
            pid=server.pid,
            model=server.model,
            started_at=time.time(),
            reason=action.reason,
            restarted=action.restart,
            memory=memory,
        )
        self._answer_restart(True)

    async def _memory(self, server: Supervised) -> tuple[DeviceMemory, ...]:
        """Each device's planned bytes and what the log since this start says it used; nothing
        for an adopted llama-server (we neither planned it nor have its log)."""
        if server.adopted:
            return ()
        text = await asyncio.to_thread(server.log_head, LOG_HEAD_BYTES)
        used = parse_buffers(text)
        if not used:
            log.warning("no buffer sizes in llama-server's log (it runs without -lv 4?)")
        return device_memory(used, self.planned)

    def _answer_restart(self, serving: bool) -> None:
        for waiter in self._restart_waiters:
            if not waiter.done():
                waiter.set_result(serving)
        self._restart_waiters = []

    async def _stop(self, action: Action) -> None:
        server = self.server
        if server is None:
            return
        self.publish.say(f"restarting llama-server: {action.reason}")
        await self.publish.state(CoordinatorState.RESTARTING, pid=server.pid, reason=action.reason)
        if action.drain:
            await self._drain()
        grace = self.timings.stop_grace_s if action.drain else self.timings.failover_grace_s
        await server.stop(grace)
        self._forget(server)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.timings.drain_timeout_s
        while True:
            busy = await self._http.in_flight()
            if not busy:  # 0, or it cannot tell
                return
            if time.monotonic() >= deadline:
                self.publish.warn(
                    f"{busy} requests still in flight after {self.timings.drain_timeout_s:g} s "
                    "of draining; restarting anyway"
                )
                return
            await asyncio.sleep(0.1)

    def _forget(self, server: Supervised) -> None:
        """It no longer runs: nothing is held, and the next look must come at once."""
        if self.server is server:
            self.server = None
        self.held.release(server.backends)
        self.candidates.release(server.backends)
        self._round_at = float("-inf")

    # -- before and after -----------------------------------------------------------------

    async def _adopt_or_check(self) -> None:
        found = await asyncio.to_thread(find_on_port, self.opts.host, self.opts.port)
        if found is None:
            if await _port_answers(self.opts.host, self.opts.port):
                raise CoordinatorError(
                    f"{self.opts.host}:{self.opts.port} is in use by a program that is not "
                    "llama-server; choose another --port"
                )
            await self._check_model()
            return
        await self._adopt(found)

    async def _check_model(self) -> None:
        if self.model is None:
            raise CoordinatorError("no model: give --model PATH or set CORRAL_MODEL")
        if not await asyncio.to_thread(self.model.is_file):
            raise CoordinatorError(f"model file not found: {self.model}")

    async def _adopt(self, found: AdoptedServer) -> None:
        watch = await self._watch_load(bool(found.backends))
        try:  # a stalled load is adopted as it is: the serving loop judges it from there
            while await self._http.health() is Health.LOADING and watch.stalled() is None:
                await self._sample_load(watch, found.pid, None)
                await self._tell_load(watch)
                await asyncio.sleep(0.1)
        finally:
            self.load = None
        for problem in found.found.errors:
            self.publish.warn(f"adopted llama-server: {problem}")
        if self.model is None and found.model:
            self.model = Path(found.model)
        elif self.model and found.model and not await _same_file(Path(found.model), self.model):
            self.publish.warn(
                f"adopted llama-server serves {found.model}; a restart will load {self.model}"
            )
        await self._check_model()
        self.server = found
        self.held.hold(found.backends)
        self.memory = Memory(last_set=frozenset(found.backends))
        await self._serving(
            found,
            Action(Do.START, f"adopted llama-server pid {found.pid}", found.backends),
        )

    async def _shutdown(self) -> None:
        for waiter in [*self._asked_waiters, *self._restart_waiters]:
            waiter.cancel()
        server = self.server
        try:
            if server is not None:
                self.publish.say(f"stopping llama-server pid {server.pid}")
                await self.publish.state(
                    CoordinatorState.STOPPING, pid=server.pid, reason="coordinator stopping"
                )
                await server.stop(self.timings.stop_grace_s)
                self._forget(server)
            await self.publish.state(
                CoordinatorState.STOPPED, backends=(), reason="coordinator stopped"
            )
            await self.publish.event(EventKind.COORDINATOR_STOPPED, "coordinator stopped")
        finally:
            await self._http.aclose()


async def _same_file(a: Path, b: Path) -> bool:
    return await asyncio.to_thread(lambda: a.resolve() == b.resolve())


async def _port_answers(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
