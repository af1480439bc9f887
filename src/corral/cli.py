"""The `corral` command. Builds the objects each command needs and wires them together.

Exit codes: 0 when the command ran (found or not), 1 when it could not do its job (for example
binaries missing), 2 on bad usage or input, with the message on stderr.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from corral.chain import ChainError, ChainOptions, build_chain, parse_source_names
from corral.discovery import Discovery
from corral.endpoint import DEFAULT_RPC_PORT, Endpoint, EndpointError, parse_endpoint
from corral.llama.binaries import BinariesNotFound, find_binaries
from corral.model import Backend, SourceName
from corral.output import backends_json, print_backends
from corral.rpc import protocol
from corral.rpc.probe import Prober
from corral.sources.scan import ScanError, ScanSource

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
    _stderr().print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _warn(messages: list[str]) -> None:
    err = _stderr()
    for m in messages:
        err.print(f"[yellow]warning:[/] {m}", highlight=False, soft_wrap=True)


def make_prober(timeout: float) -> Prober:
    """A prober that judges compatibility against the installed llama-server's protocol."""
    major, minor = protocol.CLIENT_PROTO_MAJOR, protocol.CLIENT_PROTO_MINOR
    try:
        found = find_binaries()
        if found.rpc_proto_major is not None and found.rpc_proto_minor is not None:
            major, minor = found.rpc_proto_major, found.rpc_proto_minor
    except BinariesNotFound:
        pass
    return Prober(timeout=timeout, client_major=major, client_minor=minor)


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
    prober = make_prober(timeout)

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
) -> None:
    """Scan networks for RPC backends (the scan source alone)."""
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
    prober = make_prober(timeout)
    prober.host_up_means_busy = False
    source.prober = prober
    report = asyncio.run(source.collect())
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
    prober = make_prober(timeout)
    chain = build_chain(names, options, prober)
    for src in chain:
        if isinstance(src, ScanSource):
            try:
                src.networks()
            except ScanError as exc:
                _bad_input(str(exc))
    result = asyncio.run(Discovery(chain, prober).run())
    _warn(result.warnings)
    if json_out:
        print(backends_json(result.backends))
        return
    console = _stdout()
    print_backends(console, result.backends, "RPC backends")
    if result.deciding_source:
        chosen = ",".join(str(e) for e in result.chosen)
        console.print(f"Coordinator set (from source '{result.deciding_source}'): {chosen}")
    else:
        console.print("No live backend: nothing for a coordinator to use yet.")


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
            _stderr().print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
    print(bin_dir)


@llama_app.command("bin-dir")
def llama_bin_dir() -> None:
    """Print the directory holding the binaries, or exit 1 saying how to get them."""
    try:
        print(find_binaries().bin_dir)
    except BinariesNotFound as exc:
        _stderr().print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the backends running until Ctrl-C.")] = False,
) -> None:
    """Start two local backends and show `corral backends` finding them."""
    from corral.demo import run_demo

    try:
        binaries = find_binaries()
    except BinariesNotFound as exc:
        _stderr().print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    code = asyncio.run(run_demo(binaries, _stdout(), keep))
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
