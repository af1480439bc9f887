"""Build and run the control plane: the dashboard, the monitor and (with a model) the coordinator,
in one event loop, over one store and one prober.

Order of start: the dashboard binds first (a taken port fails before anything else starts), then
the monitor, then — after the monitor's first discovery run, so its first start sees every
backend — the coordinator. Everything stops on `stop`, and every child process is stopped
before `run_plane` returns (they also die with this process: corral.llama.supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.coordinator.candidates import Candidates
from corral.coordinator.pidfile import AlreadyRunning, claim, log_path, pidfile_path, release
from corral.coordinator.policy import PolicyConfig
from corral.coordinator.publish import Publisher, Say
from corral.coordinator.runner import CoordinatorError, Runner, Timings
from corral.discovery import Discovery
from corral.endpoint import Endpoint
from corral.llama.server import ServerOptions
from corral.models.fetch import Download
from corral.models.reference import ModelError
from corral.monitor import DEFAULT_FORGET_AFTER_S, DEFAULT_MAX_BACKENDS, PROBE_STAGGER_S, Monitor
from corral.net.notify import Notifier
from corral.plane.control import RunnerControl
from corral.plane.fetching import fetch_model
from corral.plane.parts import MonitorRescan, first_discovery
from corral.plane.readiness import probe_url, report_service
from corral.rpc.held import HeldBackends
from corral.rpc.probe import Prober
from corral.sources.chain import ChainOptions, build_chain
from corral.store.base import Store
from corral.store.factory import open_store
from corral.types import SourceName
from corral.web.app import create_app
from corral.web.history import DEFAULT_STEP_S
from corral.web.security import DEFAULT_MAX_NODES, check_bind
from corral.web.server import serve

log = logging.getLogger(__name__)

FIRST_DISCOVERY_S = 30.0  # the coordinator waits this long for it, then starts regardless
SHUTDOWN_S = 30.0  # bound on the coordinator stopping (llama-server gets its own grace inside)
STOP_S = 5.0  # bound on every other part (dashboard, monitor) stopping once asked
CANCEL_S = 2.0  # a part cancelled for overstaying gets this long to unwind, then is left behind


class PlaneError(Exception):
    """The control plane could not run; `code` is the exit status (1: could not, 2: bad input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class WatchPlan:
    """What the monitor runs: the discovery chain and its two paces."""

    sources: list[SourceName]
    chain: ChainOptions
    recheck_s: float = 2.0
    discover_s: float = 60.0
    forget_after_s: float = DEFAULT_FORGET_AFTER_S  # --forget-after
    max_backends: int = DEFAULT_MAX_BACKENDS  # --max-backends


@dataclass(frozen=True, slots=True)
class CoordinatorPlan:
    model: Path | None  # None until `fetch` has fetched it
    llama_server: Path
    server: ServerOptions
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    timings: Timings = field(default_factory=Timings)
    explicit: tuple[Endpoint, ...] = ()
    fetch: Download | None = None  # a model from Hugging Face, fetched once the page is up


@dataclass(frozen=True, slots=True)
class PlaneConfig:
    state: Path
    watch: WatchPlan
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    insecure: bool = False
    coordinator: CoordinatorPlan | None = None
    coordinator_url: str | None = None  # /v1 forwarding when no coordinator runs in-process
    redis_url: str | None = None
    environ: Mapping[str, str] | None = None  # for the store's Redis settings; None: os.environ
    max_nodes: int = DEFAULT_MAX_NODES  # --max-nodes: live node registrations the API takes
    history_step_s: float = DEFAULT_STEP_S  # --history-step: the page's charts' sample pace


@dataclass
class Plane:
    """What runs, for whoever started it (handed to `on_ready`)."""

    store: Store
    monitor: Monitor
    runner: Runner | None
    dashboard_url: str


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set `stop`: everything then stops in order, children first.

    Only the first one: a second signal while stopping acts as if Corral had not caught it (the
    process ends at once; its children die with it, see corral.llama.supervisor)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def first(sig: signal.Signals) -> None:
        log.info("control plane: %s received; stopping (another one ends at once)", sig.name)
        for each in signals:
            loop.remove_signal_handler(each)
            signal.signal(each, signal.SIG_DFL)
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, first, sig)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _runner(
    cfg: PlaneConfig,
    plan: CoordinatorPlan,
    store: Store,
    prober: Prober,
    held: HeldBackends,
    say: Say,
    warn: Say,
) -> Runner:
    port = plan.server.port
    return Runner(
        opts=plan.server,
        model=plan.model,
        llama_server=plan.llama_server,
        candidates=Candidates(plan.explicit, store, prober),
        publish=Publisher(store, port, say, warn),
        log_path=log_path(cfg.state, port),
        policy=plan.policy,
        timings=plan.timings,
        held=held,
    )


def _monitor(
    cfg: PlaneConfig, store: Store, prober: Prober, held: HeldBackends, runner: Runner | None
) -> Monitor:
    chain = replace(cfg.watch.chain, store=store)
    names = cfg.watch.sources

    def discovery() -> Discovery:
        return Discovery(build_chain(names, chain, prober), prober, stagger_s=PROBE_STAGGER_S)

    return Monitor(
        store,
        prober,
        discovery,
        cfg.watch.recheck_s,
        cfg.watch.discover_s,
        # Without a coordinator here, what one elsewhere holds comes from the store.
        held=held,
        runner_owns_held=runner is not None,
        watch_nodes=SourceName.REGISTRY in names,
        forget_after_s=cfg.watch.forget_after_s,
        max_backends=cfg.watch.max_backends,
    )


async def run_plane(
    cfg: PlaneConfig,
    prober: Prober,
    stop: asyncio.Event,
    *,
    say: Say,
    warn: Say,
    on_ready: Callable[[Plane], None] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Run until `stop` is set (or a part fails: PlaneError). Raises InsecureBindError before
    anything starts when the dashboard would listen beyond loopback without a token. With a
    `notifier` (run as a systemd service) it says READY=1 once the dashboard answers HTTP."""
    check_bind(cfg.host, cfg.token, cfg.insecure)
    try:
        store = await open_store(cfg.redis_url, cfg.state, environ=cfg.environ)
    except ValueError as exc:
        raise PlaneError(str(exc), 2) from None
    pid_path = pidfile_path(cfg.state, cfg.coordinator.server.port) if cfg.coordinator else None
    try:
        if pid_path is not None:
            try:
                await asyncio.to_thread(claim, pid_path)
            except AlreadyRunning as exc:
                port = cfg.coordinator.server.port if cfg.coordinator else 0
                raise PlaneError(f"coordinator port {port}: {exc}") from None
        await _run(cfg, store, prober, stop, say, warn, on_ready, notifier)
    finally:
        if pid_path is not None:
            await asyncio.to_thread(release, pid_path)
        await store.close()


async def _run(
    cfg: PlaneConfig,
    store: Store,
    prober: Prober,
    stop: asyncio.Event,
    say: Say,
    warn: Say,
    on_ready: Callable[[Plane], None] | None,
    notifier: Notifier | None = None,
) -> None:
    plan = cfg.coordinator
    held = HeldBackends()  # one owner: the runner when there is one, else the monitor
    prober = prober.reading(held)
    runner = _runner(cfg, plan, store, prober, held, say, warn) if plan else None
    monitor = _monitor(cfg, store, prober, held, runner)
    control = None
    if runner is not None:
        t = runner.timings
        control = RunnerControl(runner, restart_timeout_s=t.drain_timeout_s + t.stop_grace_s + 30)
    app = create_app(
        store,
        rescan=MonitorRescan(monitor),
        coordinator=control,
        coordinator_url=runner.opts.base_url if runner else cfg.coordinator_url,
        token=cfg.token,
        max_nodes=cfg.max_nodes,
        history_step_s=cfg.history_step_s,
        coordinator_log=runner.log_path if runner else None,
    )
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    tasks: dict[str, asyncio.Task[None]] = {}
    service: asyncio.Task[None] | None = None  # not a part: it ends after STOPPING=1
    tasks["dashboard"] = asyncio.create_task(
        serve(
            app,
            cfg.host,
            cfg.port,
            insecure=cfg.insecure,
            stop=stop,
            on_ready=bound.set_result,
            handle_signals=False,
        )
    )
    try:
        first: set[asyncio.Future[Any]] = {bound, tasks["dashboard"]}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not bound.done():  # it ended before it was up: failed, or stopped that early
            _raise_failure("dashboard", tasks["dashboard"], stop)
            return
        if notifier is not None:
            url = probe_url(cfg.host, bound.result())
            service = asyncio.create_task(report_service(notifier, url, stop))
        tasks["monitor"] = asyncio.create_task(monitor.run(stop))
        if runner is not None and control is not None:
            if plan is not None and plan.fetch is not None:
                runner.model = await _fetch(plan.fetch, runner, stop, say)
            if not await _first_discovery(monitor, stop) and not stop.is_set():
                warn(f"no discovery run completed in {FIRST_DISCOVERY_S:g} s; starting anyway")
            if not stop.is_set():
                tasks["coordinator"] = asyncio.create_task(runner.run(stop))
                tasks["speed"] = asyncio.create_task(control.run(stop))
        if on_ready is not None and not stop.is_set():
            on_ready(Plane(store, monitor, runner, _url(cfg.host, bound.result())))
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait(
            {stopped, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED
        )
        stopped.cancel()
        failed = next((n for n, t in tasks.items() if t in done and not stop.is_set()), None)
        stop.set()
        await _finish(tasks)
        if failed is not None:
            _raise_failure(failed, tasks[failed], None)
    finally:
        stop.set()
        if service is not None:  # STOPPING=1 first: the parts may take their time
            await asyncio.wait({service}, timeout=STOP_S)
        await _finish(tasks)


async def _fetch(fetch: Download, runner: Runner, stop: asyncio.Event, say: Say) -> Path | None:
    try:
        return await fetch_model(fetch, runner.publish, stop, say)
    except ModelError as exc:
        raise PlaneError(f"--model: {exc}") from None


async def _first_discovery(monitor: Monitor, stop: asyncio.Event) -> bool:
    waiting = asyncio.create_task(first_discovery(monitor, FIRST_DISCOVERY_S))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    found = waiting.done() and waiting.result()
    for task in (waiting, stopped):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return found


async def _finish(tasks: dict[str, asyncio.Task[None]]) -> None:
    """Let every part stop by itself (they all watch `stop`); cancel what overstays its bound
    (the coordinator's is longer: llama-server's grace), and leave behind what then ignores
    the cancellation: a part that hangs (a discovery source, say) never holds up the exit."""

    async def finish(name: str, task: asyncio.Task[None]) -> None:
        if task.cancelling():  # cancelled by an earlier call, and left behind
            return
        bound = SHUTDOWN_S if name == "coordinator" else STOP_S
        await asyncio.wait({task}, timeout=bound)
        if task.done():
            return
        log.warning("control plane: the %s did not stop in %g s; cancelling it", name, bound)
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_S)
        if not task.done():
            log.warning("control plane: the %s ignored its cancellation; left behind", name)
        elif not task.cancelled():
            task.exception()  # what it raised while being cancelled: retrieved, not reported

    await asyncio.gather(*(finish(n, t) for n, t in tasks.items() if not t.done()))


def _raise_failure(name: str, task: asyncio.Task[None], stop: asyncio.Event | None) -> None:
    """Raise what ended the part `name` (a PlaneError when it is the user's to fix)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        if stop is not None and stop.is_set():
            return  # asked to stop
        raise PlaneError(f"the {name} stopped unexpectedly")
    if isinstance(exc, CoordinatorError):
        # The runner speaks in `coordinator run`'s options; here llama-server's is another.
        message = str(exc).replace("--port", "--coordinator-port")
        raise PlaneError(f"coordinator: {message}") from None
    if isinstance(exc, OSError):  # the dashboard's port: taken, or not ours to bind
        raise PlaneError(f"dashboard: {exc}; choose another --port") from None
    raise exc
