"""The coordinator's command-line options, shared by `corral coordinator run` and `corral up`.

Declared once as typer aliases, checked and turned into the runner's settings in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from corral.coordinator.policy import OnChange, PolicyConfig
from corral.coordinator.runner import Timings
from corral.endpoint import Endpoint, parse_endpoint
from corral.llama.server import ServerOptions
from corral.llama.split import parse_tensor_split

ModelOpt = Annotated[
    Path | None, typer.Option(envvar="CORRAL_MODEL", help="GGUF model file (or CORRAL_MODEL).")
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
    OnChange, typer.Option(help="When a backend becomes ready: restart to include it, or not.")
]
LocalFallbackOpt = Annotated[
    bool, typer.Option(help="Serve on local devices alone while too few backends are ready.")
]
DebounceOpt = Annotated[
    float, typer.Option(min=0, help="Seconds a backend must stay ready before it joins.")
]
DrainTimeoutOpt = Annotated[
    float, typer.Option(min=0, help="Planned restart: wait this long for requests in flight.")
]
StartTimeoutOpt = Annotated[
    float, typer.Option(min=1, help="Seconds llama-server may take to load the model.")
]
ProbeIntervalOpt = Annotated[
    float, typer.Option(min=0.05, help="Seconds between probes of backends not in use.")
]
ExtraArgs = Annotated[
    list[str] | None,
    typer.Argument(help="Extra llama-server flags, after `--`.", show_default=False),
]


def parse_backends(texts: list[str]) -> tuple[Endpoint, ...]:
    """`--backend` values through the endpoint gate; raises EndpointError naming which one."""
    out = [parse_endpoint(text, where=f"--backend {i}") for i, text in enumerate(texts, 1)]
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class CoordinatorSettings:
    server: ServerOptions
    policy: PolicyConfig
    timings: Timings
    backends: tuple[Endpoint, ...]


def coordinator_settings(
    *,
    host: str,
    port: int,
    backend: list[str] | None,
    ctx_size: int | None,
    parallel: int | None,
    gpu_layers: int,
    tensor_split: str | None,
    min_backends: int,
    on_change: OnChange,
    local_fallback: bool,
    debounce: float,
    drain_timeout: float,
    start_timeout: float,
    probe_interval: float,
    extra: list[str] | None,
) -> CoordinatorSettings:
    """Raises ValueError (EndpointError included) with a message that names the option."""
    return CoordinatorSettings(
        server=ServerOptions(
            host=host,
            port=port,
            ctx_size=ctx_size,
            parallel=parallel,
            gpu_layers=gpu_layers,
            tensor_split=parse_tensor_split(tensor_split),
            extra_args=tuple(extra or ()),
        ),
        policy=PolicyConfig(
            min_backends=min_backends,
            debounce_s=debounce,
            on_change=on_change,
            local_fallback=local_fallback,
        ),
        timings=Timings(
            probe_every_s=probe_interval,
            start_timeout_s=start_timeout,
            drain_timeout_s=drain_timeout,
        ),
        backends=parse_backends(backend or []),
    )
