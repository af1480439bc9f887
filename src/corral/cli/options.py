"""Every option more than one command takes, declared once, and the checks of their values.

Only light modules are imported here (typer, the option value types): `corral --help` builds every
command's signature from these. What a value means is checked below the command line (pure
functions that raise ValueError); these turn such errors into exit code 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from corral.cli.console import bad_input
from corral.endpoint import DEFAULT_RPC_PORT

if TYPE_CHECKING:
    from corral.coordinator.settings import CoordinatorSettings

# Defaults and choices as corral.web.server (the dashboard), corral.llama.server (llama-server)
# and corral.coordinator.policy (OnChange) have them: importing the first loads FastAPI and
# uvicorn, and every module imported here slows down every command's start (typer resolves every
# command's signature first). tests/test_cli_imports.py checks that they agree.
DASHBOARD_HOST = "127.0.0.1"
DASHBOARD_PORT = 8080
LLAMA_HOST = "127.0.0.1"
LLAMA_PORT = 18080
MAX_NODES = 1024  # corral.web.security.DEFAULT_MAX_NODES
FORGET_AFTER_S = 86400.0  # corral.monitor.DEFAULT_FORGET_AFTER_S
MAX_BACKENDS = 4096  # corral.monitor.DEFAULT_MAX_BACKENDS
OnChangeName = Literal["restart", "ignore"]  # OnChange's values
WhenShortName = Literal["cpu", "wait"]  # corral.models.plan.WhenShort's values

# --- output and store ------------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text for people.")]
RedisOpt = Annotated[
    str | None,
    typer.Option(
        # The variables are click's too (corral.store.factory reads them as well), so that a
        # value from corral.toml ranks below them.
        envvar=["CORRAL_REDIS_URL", "SOLLOL_REDIS_URL"],
        help="Redis URL (else CORRAL_REDIS_URL / SOLLOL_REDIS_URL); the embedded store if unset.",
    ),
]

# Corral's own log: corral.cli.log_format.LogFormat's values (up, dashboard, node, coordinator).
LogFormatName = Literal["text", "json"]
LogFormatOpt = Annotated[
    LogFormatName,
    typer.Option(
        "--log-format",
        help="Corral's log on stderr: text for people, or json, one object a line (time, level,"
        " logger, message, exc_info) for a log collector; progress lines become records too.",
    ),
]

# --- probing and the discovery chain ---------------------------------------------------------

# Checked by check_timeout (exit 2 with a message that names the value).
TimeoutOpt = Annotated[float, typer.Option(help="Seconds a probe may take, connect included.")]
ScanTimeoutOpt = Annotated[float, typer.Option(help="Per-address scan timeout.")]
CidrOpt = Annotated[list[str] | None, typer.Option("--cidr", help="Network to scan (repeatable).")]
# Checked by check_ports.
RpcPortsOpt = Annotated[list[int] | None, typer.Option("--port", help="RPC port (repeatable).")]
ScanPortOpt = Annotated[
    list[int] | None,
    typer.Option("--scan-port", help="RPC port to scan (repeatable; default 50052)."),
]
LoopbackOpt = Annotated[
    bool, typer.Option(help="Also scan loopback networks when no --cidr is given.")
]
LargeOpt = Annotated[bool, typer.Option(help="Allow networks larger than /16.")]
SourcesOpt = Annotated[
    str | None, typer.Option(help="Sources in priority order, e.g. process,file,scan.")
]
BackendsFileOpt = Annotated[
    str | None, typer.Option(envvar="CORRAL_BACKENDS_FILE", help="Path of rpc_backends.conf.")
]

# --- the dashboard (dashboard, up, demo) -----------------------------------------------------

DashboardHostOpt = Annotated[str, typer.Option(help="Address the dashboard listens on.")]
DashboardPortOpt = Annotated[
    int, typer.Option(min=1, max=65535, help="Port the dashboard listens on.")
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure", help="Allow a non-loopback address without CORRAL_TOKEN (read-only)."
    ),
]
RecheckOpt = Annotated[
    float, typer.Option(min=0.1, max=3600, help="Seconds between re-checks of known backends.")
]
DiscoverEveryOpt = Annotated[
    float, typer.Option(min=1, max=86400, help="Seconds between runs of the discovery chain.")
]
MaxNodesOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=1_000_000,
        help="Live nodes POST /api/nodes/heartbeat takes at once; past it, 429 (a registered"
        " node's heartbeat always passes).",
    ),
]
ForgetAfterOpt = Annotated[
    float,
    typer.Option(
        min=1,
        help="Seconds after which a backend that has not answered and that no source but the"
        " last known view has seen is forgotten (removed, with an event).",
    ),
]
MaxBackendsOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=1_000_000,
        help="Backends kept at most; past it the offline ones unseen longest are forgotten.",
    ),
]
# Seconds between the page's history samples (corral.web.history); tests shorten it.
HistoryStepOpt = Annotated[
    float, typer.Option("--history-step", min=0.05, max=600, hidden=True, help="History pace.")
]
# The long-running commands range-check their timeouts in typer.
WatchTimeoutOpt = Annotated[float, typer.Option(min=0.05, max=60, help="Seconds a probe may take.")]
WatchScanTimeoutOpt = Annotated[
    float, typer.Option(min=0.05, max=60, help="Per-address scan timeout.")
]

# --- the coordinator (coordinator run/status/stop, up, demo) ----------------------------------

LlamaHostOpt = Annotated[str, typer.Option(help="Address llama-server listens on.")]
LlamaPortOpt = Annotated[int, typer.Option(min=1, max=65535, help="Port llama-server listens on.")]
ModelOpt = Annotated[
    Path | None, typer.Option(envvar="CORRAL_MODEL", help="GGUF model file (or CORRAL_MODEL).")
]
# A Path still: typer keeps the text, and corral.cli.model_ref reads it as a reference.
ModelRefOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="CORRAL_MODEL",
        help="GGUF model: a file, hf:OWNER/REPO/FILE.gguf, or OWNER/REPO:QUANT (fetched from"
        " Hugging Face into its cache; see `corral model fetch`). Or CORRAL_MODEL.",
    ),
]
BackendOpt = Annotated[
    list[str] | None,
    typer.Option("--backend", help="Backend host:port to use besides the store's (repeat)."),
]
CtxSizeOpt = Annotated[int | None, typer.Option(min=1, help="Context size (-c).")]
ParallelOpt = Annotated[int | None, typer.Option(min=1, help="Parallel slots (-np).")]
GpuLayersOpt = Annotated[int, typer.Option(min=0, help="Layers to offload (-ngl); 99 means all.")]
TensorSplitOpt = Annotated[
    str | None,
    typer.Option(
        help="How to share the model: host:port=weight entries (they stay with their backend"
        " across failover; a backend not named weighs 1), or llama-server's plain 3,1 form."
    ),
]
MinBackendsOpt = Annotated[
    int, typer.Option(min=1, help="Serve on backends only once this many are ready.")
]
OnChangeOpt = Annotated[
    OnChangeName,
    typer.Option(help="When a backend becomes ready: restart to include it, or not."),
]
LocalFallbackOpt = Annotated[
    bool, typer.Option(help="Serve on local devices alone while too few backends are ready.")
]
WhenShortOpt = Annotated[
    WhenShortName,
    typer.Option(
        help="When the memory plan says the ready backends cannot hold the model: wait for"
        " more (state waiting, the shortfall as reason), or keep the first layers on this"
        " host's CPU."
    ),
]
DebounceOpt = Annotated[
    float, typer.Option(min=0, help="Seconds a backend must stay ready before it joins.")
]
DrainTimeoutOpt = Annotated[
    float, typer.Option(min=0, help="Planned restart: wait this long for requests in flight.")
]
StallTimeoutOpt = Annotated[
    float,
    typer.Option(
        min=1,
        help="Fail a start when llama-server's model load moves nothing for this many seconds "
        "(no bytes to its backends, no log, no memory growth); a load has no fixed deadline.",
    ),
]
ProbeIntervalOpt = Annotated[
    float, typer.Option(min=0.05, help="Seconds between probes of backends not in use.")
]
ExtraArgs = Annotated[
    list[str] | None,
    typer.Argument(help="Extra llama-server flags, after `--`.", show_default=False),
]

# What coordinator_settings_from reads from a command's locals(): every command that takes the
# coordinator's options gives its parameters these names.
COORDINATOR_PARAMS = (
    "backend",
    "ctx_size",
    "parallel",
    "gpu_layers",
    "tensor_split",
    "min_backends",
    "on_change",
    "local_fallback",
    "when_short",
    "debounce",
    "drain_timeout",
    "stall_timeout",
    "probe_interval",
    "extra",
)


# --- checks ------------------------------------------------------------------------------------


def check_timeout(timeout: float, option: str = "--timeout") -> None:
    if not 0 < timeout <= 60:
        bad_input(f"{option} {timeout}: must be more than 0 and at most 60 seconds")


def check_ports(ports: list[int] | None, option: str = "--port") -> list[int]:
    """The ports given, or the default RPC port; exits 2 on one out of range."""
    for port in ports or []:
        if not 1 <= port <= 65535:
            bad_input(f"{option} {port}: out of range 1-65535")
    return list(ports or [DEFAULT_RPC_PORT])


def check_model(model: Path | None) -> None:
    if model is not None and not model.is_file():
        bad_input(f"--model {model}: no such file")


def coordinator_settings_from(
    params: Mapping[str, Any], *, host: str, port: int
) -> CoordinatorSettings:
    """The coordinator's settings from a command's parameters (its `locals()`, which hold every
    name in COORDINATOR_PARAMS with the type its option above gives it); exits 2 naming the
    option whose value is bad."""
    from corral.coordinator.settings import coordinator_settings

    try:
        return coordinator_settings(
            host=host, port=port, **{name: params[name] for name in COORDINATOR_PARAMS}
        )
    except ValueError as exc:
        bad_input(str(exc))
