"""The `corral` command. Builds the objects each command needs and wires them together.

Exit codes: 0 when the command ran (found or not), 1 when it could not do its job (for example
binaries missing), 2 on bad usage or input, with the message on stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from corral.console import error
from corral.discovery import Discovery, DiscoveryResult
from corral.endpoint import DEFAULT_RPC_PORT, Endpoint, EndpointError, parse_endpoint
from corral.llama.binaries import BinariesNotFound, find_binaries
from corral.llama.probing import installed_prober
from corral.output import backends_json, print_backends
from corral.rpc.probe import Prober
from corral.sources.base import SourceReport
from corral.sources.chain import ChainError, ChainOptions, build_chain, parse_source_names
from corral.sources.scan import ScanError, ScanSource
from corral.types import Backend, SourceName

app = typer.Typer(
    help="Find, probe and keep serving distributed llama.cpp RPC backends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
llama_app = typer.Typer(help="The llama.cpp binaries Corral runs.", no_args_is_help=True)
app.add_typer(llama_app, name="llama")


def _stdout() -> Console:
    return Console()


def _stderr() -> Console:
    return Console(stderr=True)


def _bad_input(message: str) -> NoReturn:
    error(message)
    raise typer.Exit(2)


def _warn(messages: list[str]) -> None:
    err = _stderr()
    for m in messages:
        err.print(f"[yellow]warning:[/] {escape(m)}", highlight=False, soft_wrap=True)


def _binaries_missing(exc: BinariesNotFound) -> NoReturn:
    message = str(exc)
    if os.environ.get("CORRAL_LLAMA_BIN_DIR"):
        message += (
            "; point CORRAL_LLAMA_BIN_DIR at the directory that holds them, or unset it to use "
            "`corral llama install`'s build"
        )
    error(message)
    raise typer.Exit(1)


def _check_timeout(timeout: float) -> None:
    if not 0 < timeout <= 60:
        _bad_input(f"--timeout {timeout}: must be more than 0 and at most 60 seconds")


def _check_ports(ports: list[int]) -> list[int]:
    for port in ports:
        if not 1 <= port <= 65535:
            _bad_input(f"--port {port}: out of range 1-65535")
    return ports or [DEFAULT_RPC_PORT]


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the JSON contract instead of a table.")
]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds a probe may take, connect included.")]
CidrOpt = Annotated[list[str] | None, typer.Option("--cidr", help="Network to scan (repeatable).")]
PortOpt = Annotated[list[int] | None, typer.Option("--port", help="RPC port (repeatable).")]


@app.command()
def probe(
    endpoints: Annotated[list[str], typer.Argument(help="host:port or [v6]:port")],
    timeout: TimeoutOpt = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """Probe backends over the RPC protocol and print each one's status."""
    _check_timeout(timeout)
    parsed: list[Endpoint] = []
    for i, text in enumerate(endpoints, start=1):
        try:
            parsed.append(parse_endpoint(text, where=f"argument {i}"))
        except EndpointError as exc:
            _bad_input(str(exc))
    prober = installed_prober(timeout)

    async def run() -> list[Backend]:
        results = await asyncio.gather(*(prober.probe(ep) for ep in dict.fromkeys(parsed)))
        return [Backend(r.endpoint, [], r) for r in results]

    backends = asyncio.run(run())
    if json_out:
        print(backends_json(backends))
    else:
        print_backends(_stdout(), backends, "Probed backends")


@app.command()
def discover(
    cidr: CidrOpt = None,
    port: PortOpt = None,
    timeout: TimeoutOpt = 0.4,
    json_out: JsonOpt = False,
    include_loopback: Annotated[
        bool, typer.Option(help="Also scan loopback networks when no --cidr is given.")
    ] = False,
    allow_large: Annotated[bool, typer.Option(help="Allow networks larger than /16.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, max=2000, help="Connects in flight.")] = 500,
    redis: Annotated[
        str | None, typer.Option(help="Redis URL (else CORRAL_REDIS_URL / SOLLOL_REDIS_URL).")
    ] = None,
) -> None:
    """Scan networks for RPC backends (the scan source alone); results are remembered."""
    _check_timeout(timeout)
    ports = _check_ports(port or [])
    source = ScanSource(
        cidrs=cidr or [],
        ports=ports,
        timeout=timeout,
        include_loopback=include_loopback,
        allow_large=allow_large,
        concurrency=concurrency,
    )
    try:
        nets = source.networks()
    except ScanError as exc:
        _bad_input(str(exc))
    if not nets:
        _warn(["no networks to scan: give --cidr, or --include-loopback"])
    prober = installed_prober(timeout)
    prober.host_up_means_busy = False
    source.prober = prober
    try:
        report = asyncio.run(_scan_remembering(source, prober, redis))
    except ValueError as exc:  # a bad --redis URL
        _bad_input(str(exc))
    _warn(report.warnings)
    backends = [
        Backend(s.endpoint, [SourceName.SCAN], report.probes[str(s.endpoint)])
        for s in report.sightings
    ]
    if json_out:
        print(backends_json(backends))
    else:
        stats = source.last_stats
        title = (
            f"Scan of {', '.join(map(str, nets))}: {stats.addresses} endpoints "
            f"in {stats.seconds:.2f} s"
        )
        print_backends(_stdout(), backends, title)


async def _scan_remembering(
    source: ScanSource, prober: Prober, redis_url: str | None
) -> SourceReport:
    """Scan with the store's memory: a backend busy in the last view stays busy even when its
    accept queue, full from earlier probes, now drops our connects (see the facts file)."""
    from corral.monitor import Monitor
    from corral.paths import state_dir
    from corral.store.factory import open_store

    store = await open_store(redis_url, state_dir())
    try:
        monitor = Monitor(store, prober, lambda: Discovery([source], prober))
        await monitor.load()  # seeds the prober's busy memory
        report = await source.collect()
        await monitor.record(
            [
                Backend(s.endpoint, [SourceName.SCAN], report.probes[str(s.endpoint)])
                for s in report.sightings
            ]
        )
        report.warnings.extend(store.warnings)
        return report
    finally:
        await store.close()


@app.command()
def backends(
    json_out: JsonOpt = False,
    sources: Annotated[
        str | None, typer.Option(help="Sources in priority order, e.g. process,file,scan.")
    ] = None,
    backends_file: Annotated[
        str | None,
        typer.Option(envvar="CORRAL_BACKENDS_FILE", help="Path of rpc_backends.conf."),
    ] = None,
    cidr: CidrOpt = None,
    port: PortOpt = None,
    timeout: TimeoutOpt = 1.0,
    scan_timeout: Annotated[float, typer.Option(help="Per-address scan timeout.")] = 0.4,
    include_loopback: Annotated[bool, typer.Option(help="Scan loopback networks too.")] = False,
    allow_large: Annotated[bool, typer.Option(help="Allow networks larger than /16.")] = False,
    redis: Annotated[
        str | None, typer.Option(help="Redis URL (else CORRAL_REDIS_URL / SOLLOL_REDIS_URL).")
    ] = None,
) -> None:
    """Every backend the whole discovery chain sees, with its sources and live status."""
    _check_timeout(timeout)
    _check_timeout(scan_timeout)
    try:
        names = parse_source_names(sources)
    except ChainError as exc:
        _bad_input(str(exc))
    options = ChainOptions(
        backends_file=backends_file,
        cidrs=cidr or [],
        ports=_check_ports(port or []),
        scan_timeout=scan_timeout,
        include_loopback=include_loopback,
        allow_large=allow_large,
    )
    prober = installed_prober(timeout)
    for src in build_chain(names, options, prober):
        if isinstance(src, ScanSource):
            try:
                src.networks()
            except ScanError as exc:
                _bad_input(str(exc))
    console = _stdout()
    try:
        result = asyncio.run(_run_backends(names, options, prober, redis, json_out, console))
    except ValueError as exc:  # a bad --redis URL
        _bad_input(str(exc))
    _warn(result.warnings)
    if json_out:
        print(backends_json(result.backends))
        return
    print_backends(console, result.backends, "RPC backends")
    if result.deciding_source:
        chosen = ",".join(str(e) for e in result.chosen)
        console.print(
            f"Coordinator set (from source '{result.deciding_source}'): {escape(chosen)}",
            soft_wrap=True,
        )
    else:
        console.print("No live backend: nothing for a coordinator to use yet.")


async def _run_backends(
    names: list[SourceName],
    options: ChainOptions,
    prober: Prober,
    redis_url: str | None,
    json_out: bool,
    console: Console,
) -> DiscoveryResult:
    """Show the last known view at once (stale), verify through the chain, remember it."""
    from corral.monitor import Monitor
    from corral.output import record_to_backend
    from corral.paths import state_dir
    from corral.store.factory import open_store

    store = await open_store(redis_url, state_dir())
    try:
        options.store = store
        monitor = Monitor(
            store, prober, lambda: Discovery(build_chain(names, options, prober), prober)
        )
        last = await monitor.load()
        if last and not json_out:
            print_backends(
                console,
                [record_to_backend(r) for r in last],
                "Last known view (stale; verifying now...)",
            )
        result = await monitor.discover_once()
        result.warnings.extend(store.warnings)
        return result
    finally:
        await store.close()


@llama_app.command("install")
def llama_install() -> None:
    """Build ggml-rpc-server and llama-server (cached by version) and print their directory."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from corral.llama.build import BuildError, install

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=_stderr(),
        transient=True,
    ) as bar:
        task = bar.add_task("preparing", total=100)

        def report(stage: str, pct: int | None) -> None:
            bar.update(task, description=stage, completed=pct if pct is not None else 0)

        try:
            bin_dir = install(progress=report)
        except (BuildError, OSError) as exc:
            error(str(exc))
            raise typer.Exit(1) from None
    print(bin_dir)


@llama_app.command("bin-dir")
def llama_bin_dir() -> None:
    """Print the directory holding the binaries, or exit 1 saying how to get them."""
    try:
        print(find_binaries().bin_dir)
    except BinariesNotFound as exc:
        _binaries_missing(exc)


@app.command()
def demo(
    once: Annotated[
        bool, typer.Option("--once", help="Exit after the first answer instead of running on.")
    ] = False,
    dashboard_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of the dashboard (127.0.0.1).")
    ] = 8080,
    coordinator_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of llama-server (127.0.0.1).")
    ] = 18080,
) -> None:
    """A local cluster in one command: two backends, the dashboard, the coordinator, an answer.

    Runs until Ctrl-C (or --once). POSTs need the token it prints (or CORRAL_TOKEN).
    """
    from corral.demo import DemoPorts, run_demo

    try:
        binaries = find_binaries()
    except BinariesNotFound as exc:
        _binaries_missing(exc)
    ports = DemoPorts(dashboard_port, coordinator_port)
    # Soft wrap: log lines and the answer stay one line each, whatever the width.
    code = asyncio.run(run_demo(binaries, Console(soft_wrap=True), once, ports))
    raise typer.Exit(code)


# --- coordinator and model commands (issue "Coordinator") ---------------------------------
# The coordinator's commands live in their own module; here they are only registered.
from corral.coordinator.commands import coordinator_app  # noqa: E402

app.add_typer(coordinator_app, name="coordinator")
model_app = typer.Typer(help="Models for tests and demos.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("tiny")
def model_tiny(
    path: Annotated[str, typer.Argument(help="Where to write the .gguf file.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny random-weight GGUF (~0.5 MB). It produces NONSENSE text: tests only."""
    from pathlib import Path

    try:
        from corral.llama.tiny_model import write_tiny_model

        out = write_tiny_model(Path(path), seed=seed)
    except ImportError as exc:
        error(f"the tiny model needs the `gguf` package: {exc}")
        raise typer.Exit(1) from None
    except OSError as exc:
        error(f"cannot write {path}: {exc}")
        raise typer.Exit(1) from None
    size_kib = out.stat().st_size / 1024
    print(f"wrote {out} ({size_kib:.0f} KiB)")
    print(
        "note: its weights are random, so it produces nonsense text. It exercises the machinery "
        "(offload over RPC, failover); it says nothing."
    )


# --- end of coordinator and model commands -------------------------------------------------


# --- node agent (issue "Registry") ----------------------------------------------------------


@app.command()
def node(
    host: Annotated[
        str, typer.Option(help="Interface address the backend binds to.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Backend RPC port.")] = 50052,
    attach: Annotated[
        bool, typer.Option(help="Attach to a ggml-rpc-server already running on host:port.")
    ] = False,
    allow_any_address: Annotated[
        bool, typer.Option(help="Allow binding 0.0.0.0 (the protocol has no authentication).")
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="Backend threads (-t).")] = None,
    devices: Annotated[str | None, typer.Option(help="Backend devices (-d DEV1,DEV2).")] = None,
    cache: Annotated[bool, typer.Option(help="Backend local tensor cache (-c).")] = False,
    heartbeat: Annotated[
        float, typer.Option(min=0.1, max=60, help="Seconds between heartbeats.")
    ] = 2.0,
    mdns: Annotated[bool, typer.Option(help="Announce the backend by mDNS/DNS-SD.")] = True,
    redis: Annotated[
        str | None, typer.Option(help="Redis URL (else CORRAL_REDIS_URL / SOLLOL_REDIS_URL).")
    ] = None,
    register: Annotated[
        str | None, typer.Option(help="Also register over HTTP with a dashboard at this URL.")
    ] = None,
) -> None:
    """Run beside ggml-rpc-server: supervise or attach to it, heartbeat, announce."""
    from corral.node.command import NodeOptions, NodeOptionsError, run_node

    binaries = None
    if not attach:
        try:
            binaries = find_binaries()
        except BinariesNotFound as exc:
            _binaries_missing(exc)
    opts = NodeOptions(
        host=host,
        port=port,
        attach=attach,
        allow_any_address=allow_any_address,
        threads=threads,
        devices=devices,
        cache=cache,
        heartbeat_s=heartbeat,
        mdns=mdns,
        redis_url=redis,
        register_url=register,
        token=os.environ.get("CORRAL_TOKEN"),
    )
    try:
        code = asyncio.run(run_node(opts, binaries))
    except (NodeOptionsError, ValueError) as exc:
        _bad_input(str(exc))
    raise typer.Exit(code)


# --- end of node agent ---------------------------------------------------------------------


# --- dashboard and control plane (issue "Dashboard") ----------------------------------------
# `corral dashboard` (page + API + metrics + monitor) and `corral up` (that, plus the coordinator,
# in one process) live in corral.plane.command; here they are only registered.
from corral.plane.command import dashboard as dashboard_command  # noqa: E402
from corral.plane.command import up as up_command  # noqa: E402

app.command("dashboard")(dashboard_command)
app.command("up")(up_command)


# --- end of dashboard and control plane -----------------------------------------------------


def main() -> None:
    # Stray library warnings get one plain, labelled line; commands that run for long (node, up)
    # set their own, timestamped format.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
