"""`corral dashboard` and `corral up`: check the options, build a PlaneConfig, run the plane.

Exit codes as in corral.cli: 0 when it ran (and was stopped), 1 when it could not (a port taken,
binaries missing), 2 on bad usage or input (including a non-loopback bind without a token).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from corral.console import fail, say, warn
from corral.coordinator.options import (
    BackendOpt,
    CtxSizeOpt,
    DebounceOpt,
    DrainTimeoutOpt,
    ExtraArgs,
    GpuLayersOpt,
    LocalFallbackOpt,
    MinBackendsOpt,
    OnChangeOpt,
    ParallelOpt,
    ProbeIntervalOpt,
    StartTimeoutOpt,
    TensorSplitOpt,
    coordinator_settings,
)
from corral.coordinator.policy import OnChange
from corral.endpoint import DEFAULT_RPC_PORT
from corral.llama.binaries import BinariesNotFound, LlamaBinaries, find_binaries
from corral.llama.probing import prober_for
from corral.llama.server import DEFAULT_PORT as COORDINATOR_PORT
from corral.paths import state_dir
from corral.plane.plane import (
    CoordinatorPlan,
    Plane,
    PlaneConfig,
    PlaneError,
    WatchPlan,
    run_plane,
    stop_on_signals,
)
from corral.sources.chain import ChainError, ChainOptions, build_chain, parse_source_names
from corral.sources.scan import ScanError, ScanSource
from corral.web import DEFAULT_HOST, DEFAULT_PORT, InsecureBindError, check_bind

HostOpt = Annotated[str, typer.Option(help="Address the dashboard listens on.")]
PortOpt = Annotated[int, typer.Option(min=1, max=65535, help="Port the dashboard listens on.")]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure", help="Allow a non-loopback address without CORRAL_TOKEN (read-only)."
    ),
]
RedisOpt = Annotated[
    str | None, typer.Option(help="Redis URL (else CORRAL_REDIS_URL / SOLLOL_REDIS_URL).")
]
RecheckOpt = Annotated[
    float, typer.Option(min=0.1, max=3600, help="Seconds between re-checks of known backends.")
]
DiscoverOpt = Annotated[
    float, typer.Option(min=1, max=86400, help="Seconds between runs of the discovery chain.")
]
SourcesOpt = Annotated[
    str | None, typer.Option(help="Sources in priority order, e.g. process,file,scan.")
]
BackendsFileOpt = Annotated[
    str | None, typer.Option(envvar="CORRAL_BACKENDS_FILE", help="Path of rpc_backends.conf.")
]
CidrOpt = Annotated[list[str] | None, typer.Option("--cidr", help="Network to scan (repeatable).")]
ScanPortOpt = Annotated[
    list[int] | None,
    typer.Option("--scan-port", help="RPC port to scan (repeatable; default 50052)."),
]
LoopbackOpt = Annotated[bool, typer.Option(help="Scan loopback networks too.")]
LargeOpt = Annotated[bool, typer.Option(help="Allow networks larger than /16.")]
TimeoutOpt = Annotated[float, typer.Option(min=0.05, max=60, help="Seconds a probe may take.")]
ScanTimeoutOpt = Annotated[float, typer.Option(min=0.05, max=60, help="Per-address scan timeout.")]


def _watch(
    sources: str | None,
    backends_file: str | None,
    cidr: list[str] | None,
    scan_port: list[int] | None,
    include_loopback: bool,
    allow_large: bool,
    scan_timeout: float,
    recheck: float,
    discover_every: float,
) -> WatchPlan:
    try:
        names = parse_source_names(sources)
    except ChainError as exc:
        fail(str(exc), 2)
    for port in scan_port or []:
        if not 1 <= port <= 65535:
            fail(f"--scan-port {port}: out of range 1-65535", 2)
    chain = ChainOptions(
        backends_file=backends_file,
        cidrs=cidr or [],
        ports=scan_port or [DEFAULT_RPC_PORT],
        scan_timeout=scan_timeout,
        include_loopback=include_loopback,
        allow_large=allow_large,
    )
    for src in build_chain(names, chain, prober_for(None)):
        if isinstance(src, ScanSource):
            try:
                src.networks()
            except ScanError as exc:
                fail(str(exc), 2)
    return WatchPlan(names, chain, recheck, discover_every)


def _token() -> str | None:
    return os.environ.get("CORRAL_TOKEN") or None


def _check_bind(host: str, token: str | None, insecure: bool) -> None:
    try:
        check_bind(host, token, insecure)
    except InsecureBindError as exc:
        fail(str(exc), 2)


def _announce(token: str | None) -> Callable[[Plane], None]:
    def announce(plane: Plane) -> None:
        say(f"dashboard: {plane.dashboard_url}/")
        if token:
            say("actions (POST) need 'Authorization: Bearer $CORRAL_TOKEN'")
        else:
            say("no CORRAL_TOKEN: the dashboard is read-only (every POST answers 401)")
        if plane.runner is not None:
            say(f"coordinator: llama-server on {plane.runner.opts.base_url}, also at /v1 here")
            say(f"llama-server log: {plane.runner.log_path}")
        say("Ctrl-C stops everything")

    return announce


def _run(cfg: PlaneConfig, binaries: LlamaBinaries | None, timeout: float) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_plane(
            cfg,
            prober_for(binaries, timeout),
            stop,
            say=say,
            warn=warn,
            on_ready=_announce(cfg.token),
        )

    try:
        asyncio.run(main())
    except PlaneError as exc:
        fail(str(exc), exc.code)
    except InsecureBindError as exc:
        fail(str(exc), 2)


def dashboard(
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    insecure: InsecureOpt = False,
    redis: RedisOpt = None,
    recheck: RecheckOpt = 2.0,
    discover_every: DiscoverOpt = 60.0,
    sources: SourcesOpt = None,
    backends_file: BackendsFileOpt = None,
    cidr: CidrOpt = None,
    scan_port: ScanPortOpt = None,
    include_loopback: LoopbackOpt = False,
    allow_large: LargeOpt = False,
    timeout: TimeoutOpt = 1.0,
    scan_timeout: ScanTimeoutOpt = 0.4,
    coordinator_url: Annotated[
        str | None,
        typer.Option(help="Forward /v1/* to this llama-server (e.g. http://127.0.0.1:18080)."),
    ] = None,
) -> None:
    """Serve the page, the API and the metrics, with the monitor keeping the store true.

    Actions need CORRAL_TOKEN. The coordinator shown is what `corral coordinator run` publishes
    to the same store.
    """
    token = _token()
    _check_bind(host, token, insecure)
    if coordinator_url is not None and not coordinator_url.startswith(("http://", "https://")):
        fail(f"--coordinator-url {coordinator_url!r}: expected http://HOST:PORT", 2)
    watch = _watch(
        sources,
        backends_file,
        cidr,
        scan_port,
        include_loopback,
        allow_large,
        scan_timeout,
        recheck,
        discover_every,
    )
    try:
        binaries: LlamaBinaries | None = find_binaries()
    except BinariesNotFound:
        binaries = None  # only the protocol version to judge backends by is missing
    cfg = PlaneConfig(
        state=state_dir(),
        watch=watch,
        host=host,
        port=port,
        token=token,
        insecure=insecure,
        coordinator_url=coordinator_url,
        redis_url=redis,
    )
    _run(cfg, binaries, timeout)


def up(
    model: Annotated[
        Path | None,
        typer.Option(envvar="CORRAL_MODEL", help="GGUF model: runs the coordinator too."),
    ] = None,
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    insecure: InsecureOpt = False,
    redis: RedisOpt = None,
    recheck: RecheckOpt = 2.0,
    discover_every: DiscoverOpt = 60.0,
    sources: SourcesOpt = None,
    backends_file: BackendsFileOpt = None,
    cidr: CidrOpt = None,
    scan_port: ScanPortOpt = None,
    include_loopback: LoopbackOpt = False,
    allow_large: LargeOpt = False,
    timeout: TimeoutOpt = 1.0,
    scan_timeout: ScanTimeoutOpt = 0.4,
    coordinator_host: Annotated[
        str, typer.Option(help="Address llama-server listens on.")
    ] = "127.0.0.1",
    coordinator_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port llama-server listens on.")
    ] = COORDINATOR_PORT,
    backend: BackendOpt = None,
    ctx_size: CtxSizeOpt = None,
    parallel: ParallelOpt = None,
    gpu_layers: GpuLayersOpt = 99,
    tensor_split: TensorSplitOpt = None,
    min_backends: MinBackendsOpt = 1,
    on_change: OnChangeOpt = OnChange.RESTART,
    local_fallback: LocalFallbackOpt = True,
    debounce: DebounceOpt = 10.0,
    drain_timeout: DrainTimeoutOpt = 30.0,
    start_timeout: StartTimeoutOpt = 120.0,
    probe_interval: ProbeIntervalOpt = 1.0,
    extra: ExtraArgs = None,
) -> None:
    """The whole control plane in one process: dashboard + monitor + coordinator (with --model).

    /v1/* on the dashboard reaches the coordinator's llama-server. Actions need CORRAL_TOKEN.
    Ctrl-C or SIGTERM stops everything, llama-server included.
    """
    token = _token()
    _check_bind(host, token, insecure)
    watch = _watch(
        sources,
        backends_file,
        cidr,
        scan_port,
        include_loopback,
        allow_large,
        scan_timeout,
        recheck,
        discover_every,
    )
    try:
        settings = coordinator_settings(
            host=coordinator_host,
            port=coordinator_port,
            backend=backend,
            ctx_size=ctx_size,
            parallel=parallel,
            gpu_layers=gpu_layers,
            tensor_split=tensor_split,
            min_backends=min_backends,
            on_change=on_change,
            local_fallback=local_fallback,
            debounce=debounce,
            drain_timeout=drain_timeout,
            start_timeout=start_timeout,
            probe_interval=probe_interval,
            extra=extra,
        )
    except ValueError as exc:
        fail(str(exc), 2)
    if model is not None and not model.is_file():
        fail(f"--model {model}: no such file", 2)
    try:
        binaries: LlamaBinaries | None = find_binaries()
    except BinariesNotFound as exc:
        if model is not None:
            fail(str(exc))
        binaries = None
    plan = None
    if model is not None and binaries is not None:
        plan = CoordinatorPlan(
            model=model.resolve(),
            llama_server=binaries.llama_server,
            server=settings.server,
            policy=settings.policy,
            timings=settings.timings,
            explicit=settings.backends,
        )
    elif settings.backends:
        fail("--backend needs --model (it is a coordinator option)", 2)
    cfg = PlaneConfig(
        state=state_dir(),
        watch=watch,
        host=host,
        port=port,
        token=token,
        insecure=insecure,
        coordinator=plan,
        redis_url=redis,
    )
    _run(cfg, binaries, timeout)
