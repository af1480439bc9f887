"""A two-machine cluster for real: a backend machine and a coordinator machine, no Redis.

The LAN is tests/support/netns.py's: ns A (198.18.0.1, the coordinator machine) and ns B
(198.18.0.2, a backend machine) joined by one veth and nothing else. In ns B `corral node`
supervises a ggml-rpc-server and registers it over HTTP with the dashboard in ns A (`--register`,
with the token); in ns A `corral up` runs the dashboard on the LAN address, the monitor and the
coordinator with the default ports, and takes its backends from those registrations alone.
Every process runs inside a namespace, started and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.supervisor import Child
from corral.store.base import BackendRecord, CoordinatorRecord, Store
from corral.store.sqlite import EmbeddedStore
from corral.types import Status
from tests.support.corral_cli import corral_script, isolated_env
from tests.support.netns import (
    Lan,
    can_build_lan,
    helper_argv,
    isolated_lan,
    run_in,
    wait_listening,
)
from tests.support.waiting import until

CANNOT_BUILD_LAN = can_build_lan()
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(CANNOT_BUILD_LAN is not None, reason=CANNOT_BUILD_LAN or ""),
    pytest.mark.timeout(120),
]

COORD = "198.18.0.1"
NODE = Endpoint("198.18.0.2", 50052)
DASHBOARD = f"http://{COORD}:8080"  # the defaults: nothing else listens in a fresh namespace
TOKEN = "two-machine-cluster-token"
T = TypeVar("T")
Check = Callable[[Store], Awaitable[T | None]]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
async def lan() -> AsyncIterator[Lan]:
    with isolated_lan((f"{COORD}/16",)) as built:
        built.add_address(built.ns_b, f"{NODE.host}/16")
        yield built


@pytest.fixture
async def in_ns(lan: Lan) -> AsyncIterator[list[Child]]:
    """Children started in the namespaces; stopped (by PID) before the LAN goes."""
    children: list[Child] = []
    yield children
    for child in reversed(children):
        await child.stop(grace=5)


async def start(
    lan: Lan, ns: str, argv: Sequence[str], log: Path, state: Path, children: list[Child]
) -> Child:
    env = isolated_env(state) | {"CORRAL_TOKEN": TOKEN}
    child = Child(lan.exec_argv(ns, argv), log, env=env)
    children.append(child)
    await child.start()
    return child


async def http_in_a(
    lan: Lan, tmp_path: Path, method: str, path: str, *extra: str
) -> tuple[int, Any]:
    """One request to the dashboard from ns A, the way a user on that machine makes it."""
    argv = helper_argv("http", method, DASHBOARD + path, *extra)
    out = await run_in(lan, lan.ns_a, argv, tmp_path / "http.log", seconds=40)
    line = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    return int(line["status"]), line["body"]


async def store_until(state: Path, check: Check[T], seconds: float) -> T:
    """Until `check` finds what it wants in ns A's store (the dashboard reads the same store)."""
    store = await EmbeddedStore.open(state / "corral" / "state.db")
    found: list[T] = []

    async def finds() -> bool:
        result = await check(store)
        found[:] = [] if result is None else [result]
        return bool(found)

    try:
        await until(finds, seconds, str(check.__doc__))
    finally:
        await store.close()
    return found[0]


def serving_on(want: set[Endpoint], other_than: int | None = None) -> Check[CoordinatorRecord]:
    async def check(store: Store) -> CoordinatorRecord | None:
        rec = await store.coordinator()
        ok = rec and rec.state == "serving" and set(rec.backends) == want and rec.pid != other_than
        return rec if ok else None

    check.__doc__ = f"the coordinator serving on {sorted(want)}"
    return check


def node_listed(status: Status, in_use: bool) -> Check[BackendRecord]:
    async def check(store: Store) -> BackendRecord | None:
        rec = next((b for b in await store.backends() if b.endpoint == NODE), None)
        return rec if rec and rec.status is status and rec.in_use is in_use else None

    check.__doc__ = f"{NODE} listed {status}, in use {in_use}"
    return check


async def test_a_node_on_another_machine_registers_over_http_and_the_coordinator_uses_it(
    llama_bins: LlamaBinaries, tiny_model: Path, lan: Lan, in_ns: list[Child], tmp_path: Path
) -> None:
    state_a, state_b = tmp_path / "state-a", tmp_path / "state-b"
    up_argv = [
        corral_script(), "up", "--host", COORD, "--model", str(tiny_model),
        "--sources", "registry", "--debounce", "1", "--probe-interval", "0.2",
    ]  # fmt: skip
    up = await start(lan, lan.ns_a, up_argv, tmp_path / "up.log", state_a, in_ns)
    await wait_listening(up, COORD, 8080, seconds=20)

    node_argv = [
        corral_script(), "node", "--host", NODE.host, "--port", str(NODE.port),
        "--register", DASHBOARD, "--heartbeat", "0.5", "--threads", "1", "--no-mdns",
    ]  # fmt: skip
    node = await start(lan, lan.ns_b, node_argv, tmp_path / "node.log", state_b, in_ns)
    await wait_listening(node, NODE.host, NODE.port, seconds=20)

    # The node's heartbeat crossed the LAN with the token; the coordinator took it up.
    first = await store_until(state_a, serving_on({NODE}), 30)
    assert first.pid is not None
    await store_until(state_a, node_listed(Status.BUSY, in_use=True), 10)
    status, backends = await http_in_a(lan, tmp_path, "GET", "/api/rpc_backends")
    assert status == 200, backends
    (entry,) = [b for b in backends if (b["host"], b["port"]) == (NODE.host, NODE.port)]
    assert "registry" in entry["sources"] and entry["in_use"] is True, entry
    status, reply = await http_in_a(
        lan, tmp_path, "POST", "/v1/chat/completions", "--token", TOKEN, "--json", json.dumps(CHAT)
    )
    assert status == 200 and reply["usage"]["completion_tokens"] > 0, reply
    # On its LAN address the dashboard answers any Host; acting still needs the token.
    status, refused = await http_in_a(lan, tmp_path, "POST", "/api/rescan", "--host", "other")
    assert status == 401, refused

    # The backend machine dies: its node and, with it, its ggml-rpc-server (PDEATHSIG).
    assert node.pid is not None
    os.kill(node.pid, signal.SIGKILL)  # the node this test started, by its PID
    local = await store_until(state_a, serving_on(set(), other_than=first.pid), 20)
    assert NODE.host in (local.last_reason or ""), local
    status, reply = await http_in_a(
        lan, tmp_path, "POST", "/v1/chat/completions", "--token", TOKEN, "--json", json.dumps(CHAT)
    )
    assert status == 200, reply  # served on the coordinator's own CPU now, with a warning
    await store_until(state_a, node_listed(Status.OFFLINE, in_use=False), 10)
    status, backends = await http_in_a(lan, tmp_path, "GET", "/api/rpc_backends")
    (entry,) = [b for b in backends if (b["host"], b["port"]) == (NODE.host, NODE.port)]
    assert entry["status"] == "offline" and entry["in_use"] is False, entry
