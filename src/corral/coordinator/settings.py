"""The coordinator's settings from its option values, shared by `corral coordinator run` and
`corral up`: checked and turned into the runner's parts in one place (no typer here; the options
themselves are declared in corral.cli.options)."""

from __future__ import annotations

from dataclasses import dataclass

from corral.coordinator.policy import OnChange, PolicyConfig
from corral.coordinator.runner import Timings
from corral.endpoint import Endpoint, parse_endpoint
from corral.llama.server import ServerOptions
from corral.llama.split import parse_tensor_split
from corral.models.plan import WhenShort


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
    on_change: OnChange | str,
    local_fallback: bool,
    when_short: WhenShort | str = WhenShort.WAIT,
    debounce: float,
    drain_timeout: float,
    stall_timeout: float,
    probe_interval: float,
    extra: list[str] | None,
) -> CoordinatorSettings:
    """Raises ValueError (EndpointError included) with a message that names the option.

    `on_change` may be given by its value ("restart", "ignore"), `when_short` too ("cpu", "wait").
    """
    try:
        short = WhenShort(when_short)
    except ValueError:
        choices = ", ".join(c.value for c in WhenShort)
        raise ValueError(f"--when-short {when_short!r}: expected one of {choices}") from None
    try:
        change = OnChange(on_change)
    except ValueError:
        choices = ", ".join(c.value for c in OnChange)
        raise ValueError(f"--on-change {on_change!r}: expected one of {choices}") from None
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
            on_change=change,
            local_fallback=local_fallback,
            when_short=short,
        ),
        timings=Timings(
            probe_every_s=probe_interval,
            stall_timeout_s=stall_timeout,
            drain_timeout_s=drain_timeout,
        ),
        backends=parse_backends(backend or []),
    )
