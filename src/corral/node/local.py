"""What only the backend's own machine can see: its process, and which client it serves.

psutil, not `ps` or `ss` text. A ggml-rpc-server serves one client at a time, so the single
ESTABLISHED connection on its listening port *is* the coordinator holding it.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from corral.endpoint import Endpoint
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


def node_id(state_dir: Path, host: str, port: int) -> str:
    """A node identity that stays the same across restarts (kept in the state directory)."""
    import uuid

    path = state_dir / f"node-id-{host.replace(':', '_')}-{port}"
    try:
        value = path.read_text().strip()
        uuid.UUID(value)
        return value
    except (OSError, ValueError):
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    value = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)
    return value


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
