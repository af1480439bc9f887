"""`corral coordinator run|status|stop`: build the runner's parts, and talk to a running one.

Exit codes as everywhere: 0 when the command ran, 1 when it could not do its job, 2 on bad usage
or input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.cli.configured import CoordinatorConfigOpt
from corral.cli.console import bad_input, fail, say, warn
from corral.cli.model_ref import fetch_with_bar, model_option
from corral.cli.options import (
    LLAMA_HOST,
    LLAMA_PORT,
    BackendOpt,
    CtxSizeOpt,
    DebounceOpt,
    DrainTimeoutOpt,
    ExtraArgs,
    GpuLayersOpt,
    JsonOpt,
    LlamaHostOpt,
    LlamaPortOpt,
    LocalFallbackOpt,
    LogFormatOpt,
    MinBackendsOpt,
    ModelRefOpt,
    OnChangeOpt,
    ParallelOpt,
    ProbeIntervalOpt,
    RedisOpt,
    StallTimeoutOpt,
    TensorSplitOpt,
    WhenShortOpt,
    coordinator_settings_from,
)

if TYPE_CHECKING:
    from corral.store.base import CoordinatorRecord

coordinator_app = typer.Typer(
    help="Keep a llama-server running across the healthy RPC backends.", no_args_is_help=True
)


@coordinator_app.command("run")
def run(
    config: CoordinatorConfigOpt = None,
    model: ModelRefOpt = None,
    host: LlamaHostOpt = LLAMA_HOST,
    port: LlamaPortOpt = LLAMA_PORT,
    backend: BackendOpt = None,
    ctx_size: CtxSizeOpt = None,
    parallel: ParallelOpt = None,
    gpu_layers: GpuLayersOpt = 99,
    tensor_split: TensorSplitOpt = None,
    min_backends: MinBackendsOpt = 1,
    on_change: OnChangeOpt = "restart",
    local_fallback: LocalFallbackOpt = True,
    when_short: WhenShortOpt = "wait",
    debounce: DebounceOpt = 10.0,
    drain_timeout: DrainTimeoutOpt = 30.0,
    stall_timeout: StallTimeoutOpt = 60.0,
    probe_interval: ProbeIntervalOpt = 1.0,
    redis: RedisOpt = None,
    log_format: LogFormatOpt = "text",
    extra: ExtraArgs = None,
) -> None:
    """Run (in the foreground) and supervise llama-server; Ctrl-C or `coordinator stop` ends it.

    An llama-server already serving the port is adopted, not doubled.
    """
    settings = coordinator_settings_from(locals(), host=host, port=port)
    model_path, fetch = model_option(model)  # a bad reference: exit 1 before anything starts

    import asyncio
    import signal

    from corral.cli.log_format import speakers, use_json
    from corral.coordinator.candidates import Candidates
    from corral.coordinator.pidfile import AlreadyRunning, claim, log_path, pidfile_path, release
    from corral.coordinator.publish import Publisher
    from corral.coordinator.runner import CoordinatorError, Runner
    from corral.llama.binaries import BinariesNotFound, find_binaries
    from corral.llama.probing import installed_prober
    from corral.paths import state_dir
    from corral.rpc.held import HeldBackends
    from corral.store.errors import StateFileError
    from corral.store.factory import open_store

    try:
        binaries = find_binaries()
    except BinariesNotFound as exc:
        fail(str(exc))
    if fetch is not None:
        model_path = fetch_with_bar(fetch)
    if log_format == "json":
        use_json()
    tell, caution = speakers(log_format, say, warn)

    async def main() -> None:
        state = state_dir()
        try:
            store = await open_store(redis, state)
        except ValueError as exc:
            bad_input(str(exc))
        pid_path = pidfile_path(state, port)
        try:
            await asyncio.to_thread(claim, pid_path)
        except AlreadyRunning as exc:
            await store.close()
            fail(f"port {port}: {exc}")
        held = HeldBackends()  # the runner owns it; its candidates' prober reads it
        runner = Runner(
            opts=settings.server,
            model=model_path,
            llama_server=binaries.llama_server,
            candidates=Candidates(settings.backends, store, installed_prober(1.0).reading(held)),
            publish=Publisher(store, port, tell, caution),
            log_path=log_path(state, port),
            policy=settings.policy,
            timings=settings.timings,
            held=held,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tell(f"llama-server log: {runner.log_path}")
        try:
            await runner.run(stop)
        except CoordinatorError as exc:
            fail(str(exc))
        finally:
            await asyncio.to_thread(release, pid_path)
            await store.close()

    try:
        asyncio.run(main())
    except StateFileError as exc:  # the state file locked or damaged: one line, no traceback
        fail(str(exc))


async def _read_record(redis: str | None) -> CoordinatorRecord | None:
    from corral.paths import state_dir
    from corral.store.factory import open_store

    store = await open_store(redis, state_dir())
    try:
        return await store.coordinator()
    finally:
        await store.close()


def _llama_alive(pid: int | None) -> bool:
    import psutil

    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "llama-server" in proc.name()
    except psutil.Error:
        return False


async def _health(host: str, port: int) -> str:
    from corral.coordinator.health import ServerHttp
    from corral.llama.server import ServerOptions

    http = ServerHttp(ServerOptions(host=host, port=port).base_url)
    try:
        return str(await http.health())
    finally:
        await http.aclose()


@coordinator_app.command("status")
def status(
    port: LlamaPortOpt = LLAMA_PORT,
    host: LlamaHostOpt = LLAMA_HOST,
    redis: RedisOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """What the coordinator published (backends in use, restarts), checked against reality."""
    import asyncio
    import json
    from dataclasses import asdict

    from corral.coordinator.pidfile import pidfile_path, read_owner
    from corral.paths import state_dir
    from corral.store.errors import StateFileError

    async def gather() -> dict[str, Any]:
        record = await _read_record(redis)
        owner = await asyncio.to_thread(read_owner, pidfile_path(state_dir(), port))
        out: dict[str, Any] = {"supervisor_pid": owner.pid if owner else None}
        if record is None:
            return out | {"state": "unknown", "backends": [], "record": False}
        data = asdict(record)
        data["backends"] = [str(b) for b in record.backends]
        out |= data | {"record": True}
        out["pid_alive"] = await asyncio.to_thread(_llama_alive, record.pid)
        out["health"] = await _health(host, record.port or port)
        if owner is None and record.state not in ("stopped", "failed"):
            out["state"] = f"{record.state} (stale: no coordinator running)"
        return out

    try:
        info = asyncio.run(gather())
    except StateFileError as exc:  # the state file locked or damaged: one line, no traceback
        fail(str(exc))
    if json_out:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    if not info.get("record"):
        print("no coordinator has published a state in this store yet")
        return
    backends = ", ".join(info["backends"]) or "none (local devices only)"
    print(f"state:        {info['state']}")
    print(f"backends:     {backends}")
    print(f"llama-server: pid {info['pid']} ({'alive' if info['pid_alive'] else 'not running'})")
    print(f"health:       {info['health']} on port {info['port']}")
    print(f"model:        {info['model']}")
    print(f"restarts:     {info['restarts']}")
    print(f"last reason:  {info['last_reason']}")
    print(f"supervisor:   pid {info['supervisor_pid'] or '-'}")


@coordinator_app.command("stop")
def stop(
    port: LlamaPortOpt = LLAMA_PORT,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait before killing the coordinator.")
    ] = 30.0,
) -> None:
    """Ask the running `coordinator run` for this port to stop (it stops llama-server first)."""
    import os
    import signal

    import psutil

    from corral.coordinator.pidfile import pidfile_path, read_owner
    from corral.paths import state_dir

    path = pidfile_path(state_dir(), port)
    owner = read_owner(path)
    if owner is None:
        print(f"no coordinator is running for port {port}")
        return
    proc = psutil.Process(owner.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        # Its llama-server dies with it (PR_SET_PDEATHSIG).
        warn(f"coordinator pid {owner.pid} still running after {timeout:g} s: killing it")
        proc.kill()
        proc.wait(5)
    print(f"coordinator pid {owner.pid} stopped")
    if os.path.exists(path) and read_owner(path) is None:
        path.unlink(missing_ok=True)
