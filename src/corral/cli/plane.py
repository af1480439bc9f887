"""`corral dashboard` and `corral up`: check the options, build a PlaneConfig, run the plane.

Exit codes: 0 when it ran (and was stopped), 1 when it could not (a port taken, binaries
missing), 2 on bad usage or input (including a non-loopback bind without a token).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli.configured import UpConfigOpt
from corral.cli.console import bad_input, fail, say, warn
from corral.cli.model_ref import model_option
from corral.cli.options import (
    DASHBOARD_HOST,
    DASHBOARD_PORT,
    FORGET_AFTER_S,
    LLAMA_HOST,
    LLAMA_PORT,
    MAX_BACKENDS,
    MAX_NODES,
    BackendOpt,
    BackendsFileOpt,
    CidrOpt,
    CtxSizeOpt,
    DashboardHostOpt,
    DashboardPortOpt,
    DebounceOpt,
    DiscoverEveryOpt,
    DrainTimeoutOpt,
    ExtraArgs,
    ForgetAfterOpt,
    GpuLayersOpt,
    HistoryStepOpt,
    InsecureOpt,
    LargeOpt,
    LlamaHostOpt,
    LlamaPortOpt,
    LocalFallbackOpt,
    LogFormatName,
    LogFormatOpt,
    LoopbackOpt,
    MaxBackendsOpt,
    MaxNodesOpt,
    MinBackendsOpt,
    OnChangeOpt,
    ParallelOpt,
    ProbeIntervalOpt,
    RecheckOpt,
    RedisOpt,
    ScanPortOpt,
    SourcesOpt,
    StallTimeoutOpt,
    TensorSplitOpt,
    WatchScanTimeoutOpt,
    WatchTimeoutOpt,
    WhenShortOpt,
    check_ports,
    coordinator_settings_from,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from corral.llama.binaries import LlamaBinaries
    from corral.plane.plane import Plane, PlaneConfig, WatchPlan


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
    forget_after: float,
    max_backends: int,
) -> WatchPlan:
    from corral.llama.probing import prober_for
    from corral.plane.plane import WatchPlan
    from corral.sources.chain import ChainError, ChainOptions, build_chain, parse_source_names
    from corral.sources.scan import ScanError, ScanSource

    try:
        names = parse_source_names(sources)
    except ChainError as exc:
        bad_input(str(exc))
    chain = ChainOptions(
        backends_file=backends_file,
        cidrs=cidr or [],
        ports=check_ports(scan_port, "--scan-port"),
        scan_timeout=scan_timeout,
        include_loopback=include_loopback,
        allow_large=allow_large,
    )
    for src in build_chain(names, chain, prober_for(None)):
        if isinstance(src, ScanSource):
            try:
                src.networks()
            except ScanError as exc:
                bad_input(str(exc))
    return WatchPlan(
        names,
        chain,
        recheck,
        discover_every,
        forget_after_s=forget_after,
        max_backends=max_backends,
    )


def _token() -> str | None:
    import os

    return os.environ.get("CORRAL_TOKEN") or None


def _check_bind(host: str, token: str | None, insecure: bool) -> None:
    from corral.web.security import InsecureBindError, check_bind

    try:
        check_bind(host, token, insecure)
    except InsecureBindError as exc:
        bad_input(str(exc))


def _announce(token: str | None, say: Callable[[str], None]) -> Callable[[Plane], None]:
    def announce(plane: Plane) -> None:
        say(f"dashboard: {plane.dashboard_url}/")
        if token:
            say("actions (POST) and /v1 need 'Authorization: Bearer $CORRAL_TOKEN'")
        else:
            say("no CORRAL_TOKEN: the dashboard is read-only (every POST answers 401)")
        if plane.runner is not None:
            say(f"coordinator: llama-server on {plane.runner.opts.base_url}, also at /v1 here")
            say(f"llama-server log: {plane.runner.log_path}")
        say("Ctrl-C stops everything")

    return announce


def _run(
    cfg: PlaneConfig, binaries: LlamaBinaries | None, timeout: float, log_format: LogFormatName
) -> None:
    import asyncio

    from corral.cli.log_format import speakers, use_json
    from corral.llama.probing import prober_for
    from corral.net.notify import Notifier
    from corral.plane.plane import PlaneError, run_plane, stop_on_signals
    from corral.store.errors import StateFileError
    from corral.web.security import InsecureBindError
    from corral.web.server import raise_fd_limit

    raise_fd_limit()  # before the prober and the dashboard size themselves by it
    if log_format == "json":
        use_json()
    tell, caution = speakers(log_format, say, warn)

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_plane(
            cfg,
            prober_for(binaries, timeout),
            stop,
            say=tell,
            warn=caution,
            on_ready=_announce(cfg.token, tell),
            notifier=Notifier.from_environ(),  # set when systemd runs it (corral service up)
        )

    try:
        asyncio.run(main())
    except PlaneError as exc:
        fail(str(exc), exc.code)
    except StateFileError as exc:  # the state file locked or damaged: one line, no traceback
        fail(str(exc))
    except InsecureBindError as exc:
        bad_input(str(exc))


def dashboard(
    host: DashboardHostOpt = DASHBOARD_HOST,
    port: DashboardPortOpt = DASHBOARD_PORT,
    insecure: InsecureOpt = False,
    redis: RedisOpt = None,
    recheck: RecheckOpt = 2.0,
    discover_every: DiscoverEveryOpt = 60.0,
    forget_after: ForgetAfterOpt = FORGET_AFTER_S,
    max_backends: MaxBackendsOpt = MAX_BACKENDS,
    max_nodes: MaxNodesOpt = MAX_NODES,
    sources: SourcesOpt = None,
    backends_file: BackendsFileOpt = None,
    cidr: CidrOpt = None,
    scan_port: ScanPortOpt = None,
    include_loopback: LoopbackOpt = False,
    allow_large: LargeOpt = False,
    timeout: WatchTimeoutOpt = 1.0,
    scan_timeout: WatchScanTimeoutOpt = 0.4,
    coordinator_url: Annotated[
        str | None,
        typer.Option(help="Forward /v1/* to this llama-server (e.g. http://127.0.0.1:18080)."),
    ] = None,
    log_format: LogFormatOpt = "text",
    history_step: HistoryStepOpt = 10.0,
) -> None:
    """Serve the page, the API and the metrics, with the monitor keeping the store true.

    Actions need CORRAL_TOKEN. The coordinator shown is what `corral coordinator run` publishes
    to the same store.
    """
    from corral.llama.binaries import BinariesNotFound, find_binaries
    from corral.paths import state_dir
    from corral.plane.plane import PlaneConfig

    token = _token()
    _check_bind(host, token, insecure)
    if coordinator_url is not None and not coordinator_url.startswith(("http://", "https://")):
        bad_input(f"--coordinator-url {coordinator_url!r}: expected http://HOST:PORT")
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
        forget_after,
        max_backends,
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
        max_nodes=max_nodes,
        history_step_s=history_step,
    )
    _run(cfg, binaries, timeout, log_format)


def up(
    config: UpConfigOpt = None,
    model: Annotated[
        Path | None,
        typer.Option(
            envvar="CORRAL_MODEL",
            help="GGUF model (a file, hf:OWNER/REPO/FILE.gguf or OWNER/REPO:QUANT, fetched with"
            " its progress on the page): runs the coordinator too.",
        ),
    ] = None,
    host: DashboardHostOpt = DASHBOARD_HOST,
    port: DashboardPortOpt = DASHBOARD_PORT,
    insecure: InsecureOpt = False,
    redis: RedisOpt = None,
    recheck: RecheckOpt = 2.0,
    discover_every: DiscoverEveryOpt = 60.0,
    forget_after: ForgetAfterOpt = FORGET_AFTER_S,
    max_backends: MaxBackendsOpt = MAX_BACKENDS,
    max_nodes: MaxNodesOpt = MAX_NODES,
    sources: SourcesOpt = None,
    backends_file: BackendsFileOpt = None,
    cidr: CidrOpt = None,
    scan_port: ScanPortOpt = None,
    include_loopback: LoopbackOpt = False,
    allow_large: LargeOpt = False,
    timeout: WatchTimeoutOpt = 1.0,
    scan_timeout: WatchScanTimeoutOpt = 0.4,
    coordinator_host: LlamaHostOpt = LLAMA_HOST,
    coordinator_port: LlamaPortOpt = LLAMA_PORT,
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
    log_format: LogFormatOpt = "text",
    history_step: HistoryStepOpt = 10.0,
    extra: ExtraArgs = None,
) -> None:
    """The whole control plane in one process: dashboard + monitor + coordinator (with --model).

    /v1/* on the dashboard reaches the coordinator's llama-server. Actions need CORRAL_TOKEN.
    Ctrl-C or SIGTERM stops everything, llama-server included.
    """
    params = dict(locals())  # the coordinator's options, read by coordinator_settings_from

    from corral.llama.binaries import BinariesNotFound, find_binaries
    from corral.paths import state_dir
    from corral.plane.plane import CoordinatorPlan, PlaneConfig

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
        forget_after,
        max_backends,
    )
    settings = coordinator_settings_from(params, host=coordinator_host, port=coordinator_port)
    model_path, fetch = model_option(model)  # resolved now, fetched once the page is up
    try:
        binaries: LlamaBinaries | None = find_binaries()
    except BinariesNotFound as exc:
        if model is not None:
            fail(str(exc))
        binaries = None
    plan = None
    if model is not None and binaries is not None:
        plan = CoordinatorPlan(
            model=model_path,
            llama_server=binaries.llama_server,
            server=settings.server,
            policy=settings.policy,
            timings=settings.timings,
            explicit=settings.backends,
            fetch=fetch,
        )
    elif settings.backends:
        bad_input("--backend needs --model (it is a coordinator option)")
    cfg = PlaneConfig(
        state=state_dir(),
        watch=watch,
        host=host,
        port=port,
        token=token,
        insecure=insecure,
        coordinator=plan,
        redis_url=redis,
        max_nodes=max_nodes,
        history_step_s=history_step,
    )
    _run(cfg, binaries, timeout, log_format)
