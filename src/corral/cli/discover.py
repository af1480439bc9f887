"""`corral probe`, `corral discover` and `corral backends`: one-shot looks at the backends.

Each command imports what it uses when it runs (the store's Redis client only with a Redis URL,
zeroconf only when the mdns source runs), so these start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli.console import bad_input, fail, stdout, warnings
from corral.cli.options import (
    BackendsFileOpt,
    CidrOpt,
    JsonOpt,
    LargeOpt,
    LoopbackOpt,
    RedisOpt,
    RpcPortsOpt,
    ScanTimeoutOpt,
    SourcesOpt,
    TimeoutOpt,
    check_ports,
    check_timeout,
)

if TYPE_CHECKING:
    from rich.console import Console

    from corral.discovery import DiscoveryResult
    from corral.rpc.held import HeldBackends
    from corral.rpc.probe import Prober
    from corral.sources.base import SourceReport
    from corral.sources.chain import ChainOptions
    from corral.sources.scan import ScanSource
    from corral.types import SourceName


def probe(
    endpoints: Annotated[list[str], typer.Argument(help="host:port or [v6]:port")],
    timeout: TimeoutOpt = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """Probe backends over the RPC protocol and print each one's status."""
    import asyncio

    from corral.cli.render import backends_json, print_backends
    from corral.endpoint import Endpoint, EndpointError, parse_endpoint
    from corral.llama.probing import installed_prober
    from corral.types import Backend

    check_timeout(timeout)
    parsed: list[Endpoint] = []
    for i, text in enumerate(endpoints, start=1):
        try:
            parsed.append(parse_endpoint(text, where=f"argument {i}"))
        except EndpointError as exc:
            bad_input(str(exc))
    prober = installed_prober(timeout)

    async def run() -> list[Backend]:
        # Two names of one backend are probed once (an rpc-server serves one client at a time)
        # and listed once, under the name given first, with the others.
        from corral.discovery import merge
        from corral.net.identity import identities
        from corral.sources.base import SourceReport
        from corral.types import Sighting, SourceName

        given = SourceReport(SourceName.FILE)  # a stand-in report: its source is not shown
        given.sightings.extend(Sighting(ep, SourceName.FILE) for ep in parsed)
        backends = merge([given], await identities(parsed))
        results = await asyncio.gather(*(prober.probe(b.endpoint) for b in backends))
        for backend, result in zip(backends, results, strict=True):
            backend.probe, backend.sources = result, []
        return backends

    backends = asyncio.run(run())
    if json_out:
        print(backends_json(backends))
    else:
        print_backends(stdout(), backends, "Probed backends")


def discover(
    cidr: CidrOpt = None,
    port: RpcPortsOpt = None,
    timeout: TimeoutOpt = 0.4,
    json_out: JsonOpt = False,
    include_loopback: LoopbackOpt = False,
    allow_large: LargeOpt = False,
    concurrency: Annotated[int, typer.Option(min=1, max=2000, help="Connects in flight.")] = 500,
    redis: RedisOpt = None,
) -> None:
    """Scan networks for RPC backends (the scan source alone); results are remembered."""
    import asyncio

    from corral.cli.render import backends_json, print_backends
    from corral.llama.probing import installed_prober
    from corral.rpc.held import HeldBackends
    from corral.sources.scan import ScanError, ScanSource
    from corral.store.errors import StateFileError
    from corral.types import Backend, SourceName

    check_timeout(timeout)
    ports = check_ports(port)
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
        bad_input(str(exc))
    if not nets:
        warnings(["no networks to scan: give --cidr, or --include-loopback"])
    held = HeldBackends()  # what a coordinator holds: the monitor keeps it from the store
    prober = installed_prober(timeout).reading(held)
    prober.host_up_means_busy = False
    source.prober = prober
    try:
        report = asyncio.run(_scan_remembering(source, prober, held, redis))
    except ValueError as exc:  # a bad --redis URL
        bad_input(str(exc))
    except StateFileError as exc:  # the state file locked or damaged: one line, no traceback
        fail(str(exc))
    warnings(report.warnings)
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
        print_backends(stdout(), backends, title)


async def _scan_remembering(
    source: ScanSource, prober: Prober, held: HeldBackends, redis_url: str | None
) -> SourceReport:
    """Scan with the store's memory: a backend busy in the last view stays busy even when its
    accept queue, full from earlier probes, now drops our connects (see the facts file)."""
    from corral.discovery import Discovery
    from corral.monitor import Monitor
    from corral.paths import state_dir
    from corral.store.factory import open_store
    from corral.types import Backend, SourceName

    store = await open_store(redis_url, state_dir())
    try:
        monitor = Monitor(store, prober, lambda: Discovery([source], prober), held=held)
        await monitor.load()  # seeds the prober's busy memory
        report = await source.collect()
        await monitor.record(
            [
                Backend(s.endpoint, [SourceName.SCAN], report.probes[str(s.endpoint)])
                for s in report.sightings
            ]
        )
        report.warnings.extend(store.take_warnings())
        return report
    finally:
        await store.close()


def backends(
    json_out: JsonOpt = False,
    sources: SourcesOpt = None,
    backends_file: BackendsFileOpt = None,
    cidr: CidrOpt = None,
    port: RpcPortsOpt = None,
    timeout: TimeoutOpt = 1.0,
    scan_timeout: ScanTimeoutOpt = 0.4,
    include_loopback: LoopbackOpt = False,
    allow_large: LargeOpt = False,
    redis: RedisOpt = None,
) -> None:
    """Every backend the whole discovery chain sees, with its sources and live status."""
    import asyncio

    from corral.cli.console import escape
    from corral.cli.render import backends_json, print_backends
    from corral.llama.probing import installed_prober
    from corral.rpc.held import HeldBackends
    from corral.sources.chain import ChainError, ChainOptions, build_chain, parse_source_names
    from corral.sources.scan import ScanError, ScanSource
    from corral.store.errors import StateFileError

    check_timeout(timeout)
    check_timeout(scan_timeout, "--scan-timeout")
    try:
        names = parse_source_names(sources)
    except ChainError as exc:
        bad_input(str(exc))
    options = ChainOptions(
        backends_file=backends_file,
        cidrs=cidr or [],
        ports=check_ports(port),
        scan_timeout=scan_timeout,
        include_loopback=include_loopback,
        allow_large=allow_large,
    )
    held = HeldBackends()  # what a coordinator holds: the monitor keeps it from the store
    prober = installed_prober(timeout).reading(held)
    for src in build_chain(names, options, prober):
        if isinstance(src, ScanSource):
            try:
                src.networks()
            except ScanError as exc:
                bad_input(str(exc))
    console = stdout()
    try:
        result = asyncio.run(_run_backends(names, options, prober, held, redis, json_out, console))
    except ValueError as exc:  # a bad --redis URL
        bad_input(str(exc))
    except StateFileError as exc:  # the state file locked or damaged: one line, no traceback
        fail(str(exc))
    warnings(result.warnings)
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
    held: HeldBackends,
    redis_url: str | None,
    json_out: bool,
    console: Console,
) -> DiscoveryResult:
    """Show the last known view at once (stale), verify through the chain, remember it."""
    from corral.cli.render import print_backends, record_to_backend
    from corral.discovery import Discovery
    from corral.monitor import Monitor
    from corral.paths import state_dir
    from corral.sources.chain import build_chain
    from corral.store.factory import open_store

    store = await open_store(redis_url, state_dir())
    try:
        options.store = store
        monitor = Monitor(
            store,
            prober,
            lambda: Discovery(build_chain(names, options, prober), prober),
            held=held,
        )
        last = await monitor.load()
        if last and not json_out:
            print_backends(
                console,
                [record_to_backend(r) for r in last],
                "Last known view (stale; verifying now...)",
            )
        result = await monitor.discover_once()
        result.warnings.extend(store.take_warnings())
        return result
    finally:
        await store.close()
