"""An isolated test LAN: two network namespaces joined by one veth pair, and nothing else.

    ns A (the scanner) ── veth pair ── ns B (the targets)

Neither namespace has a default route or any interface but `lo` and its veth end, so nothing sent
inside can leave the machine; every address is in 198.18.0.0/15 (set aside for benchmarks).
In this LAN an address nobody holds is silent (no ARP reply), an address ns B holds with no
listener refuses, and a server bound to an address answers there.

- `isolated_lan()` builds it and deletes both namespaces on any exit, failure included. Names
  carry our pid and a random tag, so parallel runs and CI jobs never clash; `remove_stale()`
  deletes the namespaces of runs that were killed (their pid is gone).
- `start_in()` starts a process inside a namespace through the supervisor (stopped by PID, dies
  with its parent). Processes must be stopped before the LAN is deleted.
- Run as a script it is the small helper processes the tests put inside the namespaces:
    hold HOST PORT        connect, HELLO, keep the backend busy until killed
    banner HOST PORT      a TCP server that answers with an HTTP line
    scan --cidr C [--repeat N] [...]   scans, one JSON line per scan
    http METHOD URL [--token T] [--json BODY] [--host H]
                          one request, one JSON line: status and body
  as `python3 tests/support/netns.py COMMAND ...` (`helper_argv()` builds that command line).
Needs root (ip netns) for the LAN; the helpers themselves need nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import resource
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.llama.supervisor import Child

if TYPE_CHECKING:
    from corral.sources.scan import ScanSource

BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
NS_PREFIX = "corral"
_NS_NAME = re.compile(rf"^{NS_PREFIX}-(\d+)-[0-9a-f]+-[ab]$")
IP_TIMEOUT = 10.0
HELPER = Path(__file__).resolve()


class LanError(RuntimeError):
    pass


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise LanError("the `ip` command (iproute2) is not installed") from None
    if done.returncode != 0:
        raise LanError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def can_build_lan() -> str | None:
    """None when this process can build a LAN; else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root: builds network namespaces (ip netns)"
    try:
        _ip("netns", "list")
    except LanError as exc:
        return str(exc)
    return None


def _check_address(cidr: str) -> ipaddress.IPv4Interface:
    iface = ipaddress.IPv4Interface(cidr)
    if not iface.network.subnet_of(BENCH_NET):
        raise LanError(f"{cidr}: test LAN addresses must be inside {BENCH_NET}")
    return iface


@dataclass
class Lan:
    ns_a: str
    ns_b: str
    veth_a: str
    veth_b: str
    addresses: dict[str, list[str]] = field(default_factory=dict)

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def add_address(self, ns: str, cidr: str) -> str:
        """Give `ns` the address `cidr` (e.g. 198.18.0.10/16) on its veth; return the address."""
        iface = _check_address(cidr)
        dev = self.veth_a if ns == self.ns_a else self.veth_b
        _ip("-n", ns, "addr", "add", iface.with_prefixlen, "dev", dev)
        self.addresses.setdefault(ns, []).append(str(iface.ip))
        return str(iface.ip)

    def routes(self, ns: str) -> list[str]:
        return [line for line in _ip("-n", ns, "-4", "route", "show", "table", "all").splitlines()]

    def links(self, ns: str) -> list[str]:
        return [line.split()[0] for line in _ip("-n", ns, "-br", "link").splitlines()]


def _delete_namespace(name: str) -> None:
    with contextlib.suppress(LanError):
        _ip("netns", "delete", name)


def remove_stale() -> list[str]:
    """Delete namespaces that earlier runs of this helper left behind (their pid is gone)."""
    removed: list[str] = []
    try:
        listing = _ip("netns", "list")
    except LanError:
        return removed
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_NAME.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # still running: not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _delete_namespace(name)
        removed.append(name)
    return removed


@contextlib.contextmanager
def isolated_lan(a_addresses: Sequence[str] = ("198.18.0.1/16",)) -> Iterator[Lan]:
    """Two fresh namespaces joined by a veth pair, ns A holding `a_addresses`; deleted on exit."""
    for cidr in a_addresses:
        _check_address(cidr)
    remove_stale()
    tag = secrets.token_hex(3)
    lan = Lan(
        ns_a=f"{NS_PREFIX}-{os.getpid()}-{tag}-a",
        ns_b=f"{NS_PREFIX}-{os.getpid()}-{tag}-b",
        veth_a=f"cr{tag}a",  # interface names: at most 15 characters
        veth_b=f"cr{tag}b",
    )
    created: list[str] = []
    try:
        for ns in (lan.ns_a, lan.ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
        # Create the pair inside ns A at once: it never exists in the caller's namespace.
        _ip("-n", lan.ns_a, "link", "add", lan.veth_a, "type", "veth", "peer", "name", lan.veth_b,
            "netns", lan.ns_b)  # fmt: skip
        for ns, dev in ((lan.ns_a, lan.veth_a), (lan.ns_b, lan.veth_b)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        for cidr in a_addresses:
            lan.add_address(lan.ns_a, cidr)
        for ns in (lan.ns_a, lan.ns_b):
            if any(r.startswith("default") for r in lan.routes(ns)):
                raise LanError(f"{ns} has a default route: not isolated")
        yield lan
    finally:
        for ns in reversed(created):  # deleting ns A also deletes the veth pair
            _delete_namespace(ns)


async def start_in(lan: Lan, ns: str, argv: Sequence[str], log: Path) -> Child:
    """Start `argv` inside namespace `ns` via the supervisor; the PID is the process itself."""
    child = Child(lan.exec_argv(ns, argv), log)
    await child.start()
    return child


async def wait_for_line(child: Child, text: str, seconds: float = 10.0) -> str:
    """Wait until `text` appears in the child's log; fail fast if the child exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        log = child.log_tail(200)
        if text in log:
            return log
        if child.returncode is not None:
            raise LanError(f"{child.argv} exited {child.returncode}: {log}")
        await asyncio.sleep(0.02)
    raise LanError(f"{child.argv}: no {text!r} within {seconds:g} s: {child.log_tail()}")


async def run_in(lan: Lan, ns: str, argv: Sequence[str], log: Path, seconds: float) -> str:
    """Run `argv` in `ns` to the end (killed by PID after `seconds`); return its output."""
    await asyncio.to_thread(log.unlink, missing_ok=True)
    child = await start_in(lan, ns, argv, log)
    assert child.process is not None
    try:
        await asyncio.wait_for(child.process.wait(), seconds)
    except TimeoutError:
        raise LanError(f"{argv} did not finish within {seconds:g} s") from None
    finally:
        await child.stop(grace=2)
    if child.returncode != 0:
        raise LanError(f"{argv} exited {child.returncode}: {child.log_tail(40)}")
    return await asyncio.to_thread(log.read_text)


def listening(pid: int, host: str, port: int) -> bool:
    """Is there a TCP listener on host:port in the namespace of process `pid`? (/proc, no I/O
    inside the namespace)."""
    want = f"{struct.unpack('<I', socket.inet_aton(host))[0]:08X}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f[1] == want and f[3] == "0A" for f in (line.split() for line in lines))


async def wait_listening(child: Child, host: str, port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if child.returncode is not None:
            raise LanError(f"{child.argv} exited {child.returncode}: {child.log_tail()}")
        if child.pid is not None and listening(child.pid, host, port):
            return
        await asyncio.sleep(0.02)
    raise LanError(f"{child.argv}: not listening on {host}:{port} within {seconds:g} s")


def helper_argv(*args: str) -> list[str]:
    return [sys.executable, str(HELPER), *args]


def scan_lines(output: str) -> list[dict[str, Any]]:
    """The JSON lines a `scan` helper printed (other log lines ignored)."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# --- the helper processes -------------------------------------------------------------------


def _stop_on_sigterm() -> None:
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def hold(host: str, port: int) -> None:
    """Be the one client a ggml-rpc-server serves: HELLO answered, then stay connected."""
    from corral.rpc import protocol as p

    _stop_on_sigterm()
    deadline = time.monotonic() + 5
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with sock:
        sock.sendall(p.encode_hello())
        reply = b""
        while len(reply) < p.SIZE_FIELD + p.HELLO_REPLY_SIZE:
            chunk = sock.recv(64)
            if not chunk:
                raise SystemExit("server closed the connection")
            reply += chunk
        version = p.decode_hello(reply[p.SIZE_FIELD :])
        print(f"held {host}:{port} protocol {version}", flush=True)
        sock.settimeout(None)
        while sock.recv(64):  # the server never sends unasked; returns b"" if it goes away
            pass
        print("server went away", flush=True)


def banner(host: str, port: int) -> None:
    """A TCP server that is not an RPC backend: answers every connection with an HTTP line."""
    _stop_on_sigterm()
    reply = b"HTTP/1.0 400 Bad Request\r\nServer: not-rpc\r\nContent-Length: 0\r\n\r\n"
    with (
        socket.create_server((host, port), backlog=16) as server,
        selectors.DefaultSelector() as sel,
    ):
        sel.register(server, selectors.EVENT_READ)
        print(f"listening {host}:{port}", flush=True)
        while True:
            for _ in sel.select(timeout=1.0):
                conn, _addr = server.accept()
                with conn:
                    conn.settimeout(1.0)
                    with contextlib.suppress(OSError):
                        conn.sendall(reply)
                        conn.shutdown(socket.SHUT_WR)
                        conn.recv(4096)  # let the client read before we close


async def scan_report(source: ScanSource, number: int = 1) -> dict[str, Any]:
    """Run one collect() of `source`; return what it found and what it cost, as JSON-ready."""
    from corral.net.neighbours import read_neighbour_stats
    from corral.types import result_to_json

    before = read_neighbour_stats()
    start = time.monotonic()
    report = await source.collect()
    seconds = time.monotonic() - start
    after = read_neighbour_stats()
    stats = source.last_stats
    return {
        "scan": number,
        "cidrs": source.cidrs,
        "seconds": seconds,
        "found": [result_to_json(r, []) for r in report.probes.values()],
        "warnings": report.warnings,
        "stats": {
            "addresses": stats.addresses,
            "swept": stats.swept,
            "arp_up": stats.arp_up,
            "sweep_seconds": stats.sweep_seconds,
            "retried": stats.retried,
            "paced_rate": stats.paced_rate,
            "neighbour_overflows": stats.neighbour_overflows,
        },
        "table": {
            "gc_thresh3": after.gc_thresh3 if after else None,
            "entries_after": after.entries if after else None,
            "table_fulls_delta": (
                after.table_fulls - before.table_fulls if before and after else None
            ),
        },
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def scan(args: argparse.Namespace) -> None:
    """One process doing `repeat` scans with one ScanSource (so its prober's memory carries)."""
    from corral.sources.scan import ScanSource

    source = ScanSource(
        cidrs=args.cidr,
        ports=args.port or [50052],
        timeout=args.timeout,
        allow_large=args.allow_large,
        concurrency=args.concurrency,
        arp_sweep=not args.no_sweep,
        sweep_above=args.sweep_above,
    )

    async def main() -> None:
        for i in range(args.repeat):
            print(json.dumps(await scan_report(source, i + 1)), flush=True)

    asyncio.run(main())


def http(args: argparse.Namespace) -> None:
    """One HTTP request from inside a namespace; prints {"status": ..., "body": ...}."""
    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    if args.host:
        headers["Host"] = args.host
    body = json.loads(args.json) if args.json else None
    with httpx.Client(trust_env=False, timeout=30) as client:
        reply = client.request(args.method, args.url, headers=headers, json=body)
    try:
        content: Any = reply.json()
    except ValueError:
        content = reply.text
    print(json.dumps({"status": reply.status_code, "body": content}), flush=True)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tests/support/netns.py", description="Test LAN helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hold", "banner"):
        one = sub.add_parser(name)
        one.add_argument("host")
        one.add_argument("port", type=int)
    many = sub.add_parser("scan")
    many.add_argument("--cidr", action="append", required=True)
    many.add_argument("--port", action="append", type=int)
    many.add_argument("--repeat", type=int, default=1)
    many.add_argument("--timeout", type=float, default=0.4)
    many.add_argument("--concurrency", type=int, default=500)
    many.add_argument("--allow-large", action="store_true")
    many.add_argument("--no-sweep", action="store_true")
    many.add_argument("--sweep-above", type=int, default=512)
    request = sub.add_parser("http")
    request.add_argument("method")
    request.add_argument("url")
    request.add_argument("--token")
    request.add_argument("--json")
    request.add_argument("--host")
    args = parser.parse_args(argv)
    if args.command == "http":
        http(args)
    elif args.command == "hold":
        hold(args.host, args.port)
    elif args.command == "banner":
        banner(args.host, args.port)
    else:
        scan(args)


if __name__ == "__main__":
    _main()
