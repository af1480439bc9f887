"""mDNS for real: a node announces in one network namespace, `corral backends` finds it in another.

The LAN is tests/support/netns.py's: ns A (198.18.0.1/16) and ns B joined by one veth and
nothing else. Loopback has no multicast, but a veth does, and python-zeroconf binds its sockets to
the given interface address (IP_MULTICAST_IF, IP_ADD_MEMBERSHIP), so neither namespace needs a
multicast route. Every process runs inside a namespace, started and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.supervisor import Child
from tests.support.corral_cli import corral_script, isolated_env
from tests.support.netns import (
    Lan,
    can_build_lan,
    helper_argv,
    isolated_lan,
    wait_for_line,
    wait_listening,
)
from tests.support.waiting import until

CANNOT_BUILD_LAN = can_build_lan()
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(CANNOT_BUILD_LAN is not None, reason=CANNOT_BUILD_LAN or ""),
]

NODE = Endpoint("198.18.0.2", 50052)

# Announces what no honest node would, from ns B: a port-0 service, one at the unspecified
# address, and one for the real node's endpoint with TXT values too long or not UTF-8.
POISON = """
import asyncio, signal, socket, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

host, port = sys.argv[1], int(sys.argv[2])
kind = "_ggml-rpc._tcp.local."

def service(name, address, port, txt):
    return AsyncServiceInfo(kind, f"{name}.{kind}", addresses=[socket.inet_aton(address)],
                            port=port, properties=txt, server=f"{name}.local.")

async def main():
    azc = AsyncZeroconf(interfaces=[host], ip_version=IPVersion.V4Only)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    infos = [
        service("poison-port0", host, 0, {"version": "7.0.0"}),
        service("poison-unspecified", "0.0.0.0", port, {"version": "7.0.0"}),
        service("poison-txt", host, port, {b"version": b"v" * 220, b"status": b"\\xff\\xfe"}),
        service("poison-client", host, port, {"status": "busy", "client": "coordinator:0"}),
    ]
    await asyncio.gather(*(azc.async_register_service(i) for i in infos))
    print("announced", flush=True)
    await stop.wait()
    await azc.async_unregister_all_services()
    await azc.async_close()

asyncio.run(main())
"""


@pytest.fixture
async def lan() -> AsyncIterator[Lan]:
    with isolated_lan(("198.18.0.1/16",)) as built:
        built.add_address(built.ns_b, f"{NODE.host}/16")
        yield built


@pytest.fixture
async def in_ns(lan: Lan, tmp_path: Path) -> AsyncIterator[list[Child]]:
    """Children started in the namespaces; stopped (by PID) before the LAN goes."""
    children: list[Child] = []
    yield children
    for child in reversed(children):
        await child.stop(grace=5)


def start(lan: Lan, ns: str, argv: Sequence[str], log: Path, state: Path) -> Child:
    return Child(lan.exec_argv(ns, argv), log, env=isolated_env(state))


async def until_node_reports(state_home: Path, status: str, seconds: float = 10) -> None:
    """Wait until the node's own embedded store holds a registration with `status`."""
    db = state_home / "corral" / "state.db"
    seen: list[str] = []

    def reports() -> bool:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            seen[:] = [json.loads(b)["status"] for (b,) in conn.execute("SELECT body FROM nodes")]
        return status in seen

    try:
        await until(reports, seconds, f"the node reporting {status}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last {seen}") from None


async def browse_once(lan: Lan, tmp_path: Path) -> tuple[list[dict[str, Any]], str]:
    """`corral backends --sources mdns --json` in ns A: the backends, and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *lan.exec_argv(lan.ns_a, [corral_script(), "backends", "--sources", "mdns", "--json"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=isolated_env(tmp_path / "state-a"),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()  # our own child, by PID
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    items = json.loads(out)
    assert isinstance(items, list)
    return items, err.decode()


async def browse_from_a(lan: Lan, tmp_path: Path, node: Child) -> tuple[list[dict[str, Any]], str]:
    """One browse; a second one only if the first saw nothing at all (mDNS is best-effort
    UDP), said on stdout with the node's log so a pattern of misses shows."""
    items, err = await browse_once(lan, tmp_path)
    if not items:
        print(f"mDNS browse saw nothing (stderr {err!r}); again. Node:\n{node.log_tail()}")
        items, err = await browse_once(lan, tmp_path)
    return items, f"{err}\n--- node log ---\n{node.log_tail()}"


async def test_node_announced_in_one_namespace_is_found_by_mdns_in_the_other(
    llama_bins: LlamaBinaries, lan: Lan, in_ns: list[Child], tmp_path: Path
) -> None:
    argv = [
        corral_script(), "node", "--host", NODE.host, "--port", str(NODE.port),
        "--heartbeat", "0.5", "--threads", "1",
    ]  # fmt: skip
    node = start(lan, lan.ns_b, argv, tmp_path / "node.log", tmp_path / "state-b")
    in_ns.append(node)
    await node.start()
    await wait_listening(node, NODE.host, NODE.port, seconds=15)
    await wait_for_line(node, "announced", seconds=15)

    # Neither namespace has a default or multicast route: the veth alone carries mDNS.
    for ns in (lan.ns_a, lan.ns_b):
        assert not [r for r in lan.routes(ns) if r.startswith(("default", "224.", "multicast"))]

    items, err = await browse_from_a(lan, tmp_path, node)
    assert [(i["host"], i["port"]) for i in items] == [(NODE.host, NODE.port)], (items, err)
    (item,) = items
    assert item["status"] == "ready" and item["version"] == "7.0.0", item
    assert item["sources"] == ["mdns"]
    assert "warning:" not in err, err

    # Held by a client in ns A: its node announces it busy with that client, and the browse
    # says so without probing it (a held backend answers nobody else).
    holder = start(
        lan, lan.ns_a, helper_argv("hold", NODE.host, str(NODE.port)), tmp_path / "hold.log",
        tmp_path / "state-h",
    )  # fmt: skip
    in_ns.append(holder)
    await holder.start()
    await wait_for_line(holder, "held", seconds=10)
    await until_node_reports(tmp_path / "state-b", "busy")
    items, err = await browse_from_a(lan, tmp_path, node)
    (item,) = items
    assert item["status"] == "busy", (item, err)
    assert item["error"].startswith("in use by 198.18.0.1:"), item
    assert item["error"].endswith("(announced by its node)"), item
    assert item["version"] == "7.0.0" and item["sources"] == ["mdns"]


async def test_poisoned_mdns_announcements_are_dropped_with_a_warning(
    llama_bins: LlamaBinaries, lan: Lan, in_ns: list[Child], tmp_path: Path
) -> None:
    argv = [
        corral_script(), "node", "--host", NODE.host, "--port", str(NODE.port),
        "--heartbeat", "0.5", "--threads", "1",
    ]  # fmt: skip
    node = start(lan, lan.ns_b, argv, tmp_path / "node.log", tmp_path / "state-b")
    in_ns.append(node)
    poison = start(
        lan,
        lan.ns_b,
        [sys.executable, "-c", POISON, NODE.host, str(NODE.port)],
        tmp_path / "poison.log",
        tmp_path / "state-p",
    )
    in_ns.append(poison)
    await node.start()
    await poison.start()
    await asyncio.gather(
        wait_for_line(node, "announced", seconds=15), wait_for_line(poison, "announced", seconds=15)
    )

    items, err = await browse_from_a(lan, tmp_path, node)
    # Only the honest endpoint, once (the TXT-poisoned service names the same endpoint).
    assert [(i["host"], i["port"], i["status"]) for i in items] == [
        (NODE.host, NODE.port, "ready")
    ], (items, err)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]

    def warned(service: str, why: str) -> bool:
        return any(f"mdns service '{service}._ggml-rpc._tcp.local.'" in w and why in w
                   for w in warnings)  # fmt: skip

    assert warned("poison-port0", "port 0 is a placeholder"), err
    assert warned("poison-unspecified", "unspecified address"), err
    assert warned("poison-txt", "TXT 'version' longer than 200 bytes"), err
    assert warned("poison-txt", "not UTF-8"), err
    # A "busy" claim whose client is no endpoint is not believed: the backend is probed instead.
    assert warned("poison-client", "TXT 'client': placeholder host"), err
    assert warned("poison-client", "probing instead"), err


async def test_node_bound_to_every_interface_is_published_by_its_address(
    llama_bins: LlamaBinaries, lan: Lan, in_ns: list[Child], tmp_path: Path
) -> None:
    """--allow-any-address: the backend binds 0.0.0.0 (only inside ns B here), but 0.0.0.0 is a
    placeholder to every reader, so the node registers and announces ns B's own address."""
    argv = [
        corral_script(), "node", "--host", "0.0.0.0", "--allow-any-address",
        "--port", str(NODE.port), "--heartbeat", "0.5", "--threads", "1",
    ]  # fmt: skip
    node = start(lan, lan.ns_b, argv, tmp_path / "node.log", tmp_path / "state-b")
    in_ns.append(node)
    await node.start()
    await wait_for_line(node, "announced", seconds=15)
    assert f"published as {NODE}" in node.log_tail(), node.log_tail()
    await until_node_reports(tmp_path / "state-b", "ready")

    items, err = await browse_from_a(lan, tmp_path, node)
    assert [(i["host"], i["port"], i["status"]) for i in items] == [
        (NODE.host, NODE.port, "ready")
    ], (items, err)
    assert "warning:" not in err, err
