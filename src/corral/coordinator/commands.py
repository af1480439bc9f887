"""`corral coordinator run|status|stop`: build the runner's parts, and talk to a running one.

Exit codes as in corral.cli: 0 when the command ran, 1 when it could not do its job, 2 on bad
usage or input.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn

import psutil
import typer
from rich.console import Console
from rich.markup import escape

from corral.coordinator.candidates import Candidates
from corral.coordinator.health import ServerHttp
from corral.coordinator.pidfile import (
    AlreadyRunning,
    claim,
    log_path,
    pidfile_path,
    read_owner,
    release,
)
from corral.coordinator.policy import OnChange, PolicyConfig
from corral.coordinator.publish import Publisher
from corral.coordinator.runner import CoordinatorError, Runner, Timings
from corral.endpoint import Endpoint, EndpointError, parse_endpoint
from corral.llama.binaries import BinariesNotFound, find_binaries
from corral.llama.server import DEFAULT_HOST, DEFAULT_PORT, ServerOptions
from corral.paths import state_dir
from corral.probing import installed_prober
from corral.store.base import CoordinatorRecord, Store

coordinator_app = typer.Typer(
    help="Keep a llama-server running across the healthy RPC backends.", no_args_is_help=True
)


def _err() -> Console:
    return Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    _err().print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _say(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    Console().print(f"{stamp} {escape(message)}", highlight=False, soft_wrap=True)


def _warn(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    _err().print(f"{stamp} [yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def parse_tensor_split(text: str | None) -> str | None:
    """Check `--tensor-split 1,1` here: llama-server would only fail after loading."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--tensor-split {text!r}: expected numbers like 1,1 or 3,1") from None
    if not values or any(v < 0 for v in values) or not any(values):
        raise ValueError(f"--tensor-split {text!r}: needs non-negative numbers, not all zero")
    return text


def _endpoints(texts: list[str]) -> tuple[Endpoint, ...]:
    out: list[Endpoint] = []
    for i, text in enumerate(texts, start=1):
        try:
            out.append(parse_endpoint(text, where=f"--backend {i}"))
        except EndpointError as exc:
            _fail(str(exc), 2)
    return tuple(dict.fromkeys(out))


RedisOpt = Annotated[
    str | None,
    typer.Option("--redis", help="Redis URL (else CORRAL_REDIS_URL); embedded store if unset."),
]
PortOpt = Annotated[int, typer.Option(min=1, max=65535, help="Port llama-server listens on.")]


@coordinator_app.command("run")
def run(
    model: Annotated[
        Path | None,
        typer.Option(envvar="CORRAL_MODEL", help="GGUF model file (or CORRAL_MODEL)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address llama-server listens on.")] = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    backend: Annotated[
        list[str] | None,
        typer.Option("--backend", help="Backend host:port to use besides the store's (repeat)."),
    ] = None,
    ctx_size: Annotated[int | None, typer.Option(min=1, help="Context size (-c).")] = None,
    parallel: Annotated[int | None, typer.Option(min=1, help="Parallel slots (-np).")] = None,
    gpu_layers: Annotated[
        int, typer.Option(min=0, help="Layers to offload (-ngl); 99 means all.")
    ] = 99,
    tensor_split: Annotated[
        str | None, typer.Option(help="Passed to llama-server, e.g. 1,1 (one per backend).")
    ] = None,
    min_backends: Annotated[
        int, typer.Option(min=1, help="Serve on backends only once this many are ready.")
    ] = 1,
    on_change: Annotated[
        OnChange, typer.Option(help="When a backend becomes ready: restart to include it, or not.")
    ] = OnChange.RESTART,
    local_fallback: Annotated[
        bool, typer.Option(help="Serve on local devices alone while too few backends are ready.")
    ] = True,
    debounce: Annotated[
        float, typer.Option(min=0, help="Seconds a backend must stay ready before it joins.")
    ] = 10.0,
    drain_timeout: Annotated[
        float, typer.Option(min=0, help="Planned restart: wait this long for requests in flight.")
    ] = 30.0,
    start_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds llama-server may take to load the model.")
    ] = 120.0,
    probe_interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between probes of backends not in use.")
    ] = 1.0,
    redis: RedisOpt = None,
    extra: Annotated[
        list[str] | None,
        typer.Argument(help="Extra llama-server flags, after `--`.", show_default=False),
    ] = None,
) -> None:
    """Run (in the foreground) and supervise llama-server; Ctrl-C or `coordinator stop` ends it.

    An llama-server already serving the port is adopted, not doubled.
    """
    try:
        split = parse_tensor_split(tensor_split)
    except ValueError as exc:
        _fail(str(exc), 2)
    if model is not None and not model.is_file():
        _fail(f"--model {model}: no such file", 2)
    try:
        binaries = find_binaries()
    except BinariesNotFound as exc:
        _fail(str(exc))
    opts = ServerOptions(
        host=host,
        port=port,
        ctx_size=ctx_size,
        parallel=parallel,
        gpu_layers=gpu_layers,
        tensor_split=split,
        extra_args=tuple(extra or ()),
    )
    policy = PolicyConfig(
        min_backends=min_backends,
        debounce_s=debounce,
        on_change=on_change,
        local_fallback=local_fallback,
    )
    timings = Timings(
        probe_every_s=probe_interval,
        start_timeout_s=start_timeout,
        drain_timeout_s=drain_timeout,
    )
    explicit = _endpoints(backend or [])

    async def main() -> None:
        from corral.store.factory import open_store

        state = state_dir()
        try:
            store = await open_store(redis, state)
        except ValueError as exc:
            _fail(str(exc), 2)
        pid_path = pidfile_path(state, port)
        try:
            await asyncio.to_thread(claim, pid_path)
        except AlreadyRunning as exc:
            await store.close()
            _fail(f"port {port}: {exc}")
        runner = Runner(
            opts=opts,
            model=model.resolve() if model else None,
            llama_server=binaries.llama_server,
            candidates=Candidates(explicit, store, installed_prober(1.0)),
            publish=Publisher(store, port, _say, _warn),
            log_path=log_path(state, port),
            policy=policy,
            timings=timings,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        _say(f"llama-server log: {runner.log_path}")
        try:
            await runner.run(stop)
        except CoordinatorError as exc:
            _fail(str(exc))
        finally:
            await asyncio.to_thread(release, pid_path)
            await store.close()

    asyncio.run(main())


async def _read_record(redis: str | None) -> CoordinatorRecord | None:
    from corral.store.factory import open_store

    store: Store = await open_store(redis, state_dir())
    try:
        return await store.coordinator()
    finally:
        await store.close()


def _llama_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "llama-server" in proc.name()
    except psutil.Error:
        return False


async def _health(host: str, port: int) -> str:
    http = ServerHttp(ServerOptions(host=host, port=port).base_url)
    try:
        return str(await http.health())
    finally:
        await http.aclose()


@coordinator_app.command("status")
def status(
    port: PortOpt = DEFAULT_PORT,
    host: Annotated[str, typer.Option(help="Address llama-server listens on.")] = DEFAULT_HOST,
    redis: RedisOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What the coordinator published (backends in use, restarts), checked against reality."""

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

    info = asyncio.run(gather())
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
    port: PortOpt = DEFAULT_PORT,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait before killing the coordinator.")
    ] = 30.0,
) -> None:
    """Ask the running `coordinator run` for this port to stop (it stops llama-server first)."""
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
        _warn(f"coordinator pid {owner.pid} still running after {timeout:g} s: killing it")
        proc.kill()
        proc.wait(5)
    print(f"coordinator pid {owner.pid} stopped")
    if os.path.exists(path) and read_owner(path) is None:
        path.unlink(missing_ok=True)
