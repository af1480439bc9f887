"""The registry under faults, with real processes: `corral node`, ggml-rpc-server, redis-server.

A killed node leaves the registry within its TTL (three heartbeats; Redis or the embedded store
enforces it) and its backend then shows offline from the cache; a stopped one leaves at once and
comes back with the same identity; a crashed backend is restarted by its node; a node outlives a
Redis outage and registers again; a held backend shows busy with its client; poisoned Redis keys
are dropped with a warning.

Every node is a `corral node` subprocess on its own loopback address (started through the
supervisor's Child, stopped by its PID), heartbeating every 0.5 s into a real redis-server, with
its own XDG_STATE_HOME. `corral backends` runs as a subprocess with another XDG_STATE_HOME (the
machine of the person asking), and only ever with `--sources` naming store-backed sources:
nothing here probes anything but loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from corral.endpoint import Endpoint
from corral.llama.binaries import RPC_SERVER_NAMES, LlamaBinaries
from corral.llama.supervisor import Child
from corral.node.run import advertise_host
from corral.rpc import protocol as p
from corral.rpc.probe import Prober
from corral.store import codec
from corral.store.base import MISSED_BEATS, NodeRegistration
from corral.store.redis import LEGACY_KEY, RedisStore
from corral.types import Status
from tests.support.corral_cli import Run, corral, corral_script, isolated_env
from tests.support.loopback import free_port, next_loopback
from tests.support.redis_server import RedisServer
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

HEARTBEAT = 0.5
TTL = HEARTBEAT * MISSED_BEATS


@dataclass
class Node:
    child: Child
    endpoint: Endpoint
    state_home: Path

    @property
    def pid(self) -> int:
        assert self.child.pid is not None
        return self.child.pid

    def backend_pids(self) -> list[int]:
        """The ggml-rpc-server children of this node process (psutil, by parent PID)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for proc in children:
            try:
                if proc.name() in RPC_SERVER_NAMES and proc.status() != psutil.STATUS_ZOMBIE:
                    pids.append(proc.pid)
            except psutil.NoSuchProcess:
                continue
        return pids

    def log(self) -> str:
        try:
            return self.child.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def backend_log(self) -> str:
        ep = self.endpoint
        path = self.state_home / "corral" / "logs" / f"ggml-rpc-server-{ep.host}-{ep.port}.log"
        return path.read_text(errors="replace")


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(llama_bins: LlamaBinaries, tmp_path: Path) -> AsyncIterator[StartNode]:
    nodes: list[Node] = []

    async def start(
        redis_url: str | None, endpoint: Endpoint | None = None, state_home: Path | None = None
    ) -> Node:
        host = next_loopback()
        ep = endpoint or Endpoint(host, free_port(host))
        state_home = state_home or tmp_path / f"node-{ep.host}-{ep.port}"
        argv = [
            corral_script(), "node",
            "--host", ep.host, "--port", str(ep.port),
            "--heartbeat", str(HEARTBEAT),
            "--threads", "1",
            "--no-mdns",  # loopback has no multicast; mDNS is tested in namespaces
            *(["--redis", redis_url] if redis_url else []),
        ]  # fmt: skip
        log = tmp_path / f"node-{ep.host}-{ep.port}-{len(nodes)}.log"
        child = Child(argv, log, env=isolated_env(state_home))
        await child.start()
        node = Node(child, ep, state_home)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        backends = node.backend_pids()
        await node.child.stop(grace=5)
        for pid in backends:  # the agent stops its backend on SIGTERM; make sure of it
            assert exited(pid), f"backend {pid} outlived its node"


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_server.url)
    yield store
    await store.close()


async def registered(
    store: RedisStore,
    node: Node,
    want: Callable[[NodeRegistration], bool] = lambda r: r.status is Status.READY,
    seconds: float = 15.0,
) -> NodeRegistration:
    found: list[NodeRegistration] = []

    async def check() -> bool:
        nonlocal found
        if node.child.returncode is not None:
            raise AssertionError(f"node exited {node.child.returncode}:\n{node.log()[-3000:]}")
        try:
            nodes = await store.live_nodes()
        except RedisError:  # our own connection to a restarted server: the next try reconnects
            return False
        found = [r for r in nodes if r.endpoint == node.endpoint]
        return bool(found) and want(found[0])

    try:
        await until(check, seconds, f"registration of {node.endpoint}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last {found}\nnode log:\n{node.log()[-3000:]}") from None
    return found[0]


async def backends_json(redis_url: str, sources: str, state_home: Path) -> dict[str, Any]:
    run = await corral(
        "backends", "--sources", sources, "--redis", redis_url, "--json",
        env=isolated_env(state_home),
    )  # fmt: skip
    assert run.code == 0, run.err
    # Not Run.json(): its contract check wants no devices unless ready, and a busy backend's
    # node knows its devices (see the busy test below).
    items = json.loads(run.out)
    assert isinstance(items, list)
    return {f"{i['host']}:{i['port']}": i for i in items}


# --- a node dies: gone after its TTL, and only the cache remembers it ---------------------------


async def test_killed_node_is_gone_within_its_ttl_and_its_backend_shows_offline_from_cache(
    start_node: StartNode, redis_server: RedisServer, redis_store: RedisStore, tmp_path: Path
) -> None:
    dead, alive = await start_node(redis_server.url), await start_node(redis_server.url)
    await registered(redis_store, dead)
    await registered(redis_store, alive)
    me = tmp_path / "asker"

    first = await backends_json(redis_server.url, "registry,cache", me)
    assert set(first) == {str(dead.endpoint), str(alive.endpoint)}
    for item in first.values():
        assert item["status"] == "ready" and item["sources"] == ["registry"], item

    (backend_pid,) = dead.backend_pids()
    dead_reg = await registered(redis_store, dead)
    os.kill(dead.pid, signal.SIGKILL)
    await until(lambda: exited(dead.pid), 5, f"node {dead.pid} gone")
    # No beat comes after this: Redis holds the key at most three beats more, by its own count.
    key = f"{redis_store.prefix}node:{dead_reg.node_id}"
    async with Redis.from_url(redis_server.url) as raw:
        left_ms = await raw.pttl(key)
    assert left_ms == -2 or 0 < left_ms <= TTL * 1000, f"{key} has {left_ms} ms left; TTL {TTL} s"

    async def dead_gone() -> bool:
        live = {r.endpoint for r in await redis_store.live_nodes()}
        assert alive.endpoint in live, "the live node flickered out of the registry"
        return dead.endpoint not in live

    await until(dead_gone, TTL + 10, f"{dead.endpoint} leaving the registry")
    # Its backend died with it (PR_SET_PDEATHSIG): nothing is left running.
    await until(lambda: not psutil.pid_exists(backend_pid), 5, f"backend {backend_pid} exiting too")

    second = await backends_json(redis_server.url, "registry,cache", me)
    assert second[str(dead.endpoint)]["status"] == "offline"
    assert second[str(dead.endpoint)]["sources"] == ["cache"]
    assert second[str(alive.endpoint)]["status"] == "ready"
    assert second[str(alive.endpoint)]["sources"] == ["registry", "cache"]

    # A new `corral backends` process shows what was last known, first, then verifies.
    run = await corral(
        "backends", "--sources", "registry,cache", "--redis", redis_server.url,
        env=isolated_env(me),
    )  # fmt: skip
    assert run.code == 0, run.err
    stale_at = run.out.find("Last known view (stale")
    fresh_at = run.out.find("RPC backends")
    assert 0 <= stale_at < fresh_at, run.out
    stale = run.out[stale_at:fresh_at]
    assert str(dead.endpoint) in stale and str(alive.endpoint) in stale


async def test_node_without_redis_registers_in_the_embedded_store_and_leaves_no_ghost(
    start_node: StartNode, tmp_path: Path
) -> None:
    """One machine, no Redis: node and `corral backends` share the SQLite store."""
    machine = tmp_path / "machine"
    node = await start_node(None, state_home=machine)
    shown: dict[str, Any] = {}

    async def listed() -> bool:
        nonlocal shown
        run = await corral("backends", "--sources", "registry", "--json", env=isolated_env(machine))
        assert run.code == 0, run.err
        shown = {f"{i['host']}:{i['port']}": i for i in json.loads(run.out)}
        return bool(shown)

    await until(listed, 15, f"{node.endpoint} in the embedded registry")
    assert shown[str(node.endpoint)]["status"] == "ready"
    assert shown[str(node.endpoint)]["sources"] == ["registry"]

    os.kill(node.pid, signal.SIGKILL)
    killed_at = time.time()  # the node's last write came before this, by the same clock
    await until(lambda: exited(node.pid), 5, f"node {node.pid} gone")
    # Its registration expires at most three beats after its last one: no ghost is left.
    (expires_at,) = await asyncio.to_thread(embedded_expiry, machine)
    assert expires_at <= killed_at + TTL, f"expires {expires_at - killed_at:.2f} s after the kill"

    async def gone() -> bool:
        run = await corral("backends", "--sources", "registry", "--json", env=isolated_env(machine))
        assert run.code == 0, run.err
        return bool(json.loads(run.out) == [])

    await until(gone, TTL + 15, "the dead node's registration leaving `corral backends`")


# --- a node is stopped and started again: unregistered at once, same identity -------------------


async def test_restarted_node_keeps_its_identity_and_a_stopped_one_leaves_at_once(
    start_node: StartNode, redis_server: RedisServer, redis_store: RedisStore
) -> None:
    node = await start_node(redis_server.url)
    first = await registered(redis_store, node)
    assert await node.child.stop(grace=5) == 0, node.log()
    # A clean stop unregisters: no waiting out the TTL.
    assert [r for r in await redis_store.live_nodes() if r.endpoint == node.endpoint] == []
    again = await start_node(redis_server.url, node.endpoint, node.state_home)
    second = await registered(redis_store, again)
    assert second.node_id == first.node_id
    assert second.restarts == 0


@pytest.mark.parametrize(
    ("bind", "addresses", "published"),
    [
        ("127.0.3.4", ["10.1.1.1"], "127.0.3.4"),
        ("0.0.0.0", ["127.0.0.1", "169.254.9.9", "fe80::1", "10.9.0.2", "10.1.0.7"], "10.1.0.7"),
        ("0.0.0.0", ["127.0.0.1", "::1"], "127.0.0.1"),
        ("::", ["::1", "fe80::1", "10.1.0.7", "2001:db8::5"], "2001:db8::5"),
    ],
)
def test_a_node_bound_to_every_interface_publishes_a_concrete_address(
    bind: str, addresses: list[str], published: str
) -> None:
    assert advertise_host(bind, addresses) == published
    assert advertise_host(bind, list(reversed(addresses))) == published  # stable


async def test_node_refuses_every_interface_unless_asked(
    llama_bins: LlamaBinaries, tmp_path: Path
) -> None:
    run = await corral("node", "--host", "0.0.0.0", "--no-mdns", env=isolated_env(tmp_path))
    assert run.code == 2, (run.out, run.err)
    assert "--allow-any-address" in run.err and "unauthenticated" in run.err
    assert not (tmp_path / "corral").exists(), "state was written by a node that refused to run"


# --- a backend crashes: its node restarts it ---------------------------------------------------


async def test_node_restarts_its_crashed_backend_and_keeps_the_log(
    start_node: StartNode, redis_server: RedisServer, redis_store: RedisStore
) -> None:
    node = await start_node(redis_server.url)
    await registered(redis_store, node)
    (first,) = node.backend_pids()
    os.kill(first, signal.SIGKILL)
    restarted = await registered(
        redis_store, node, lambda r: r.restarts == 1 and r.status is Status.READY
    )
    assert restarted.version == "7.0.0" and restarted.devices
    (second,) = node.backend_pids()
    assert second != first
    assert node.child.returncode is None
    log = node.log()
    assert "exited with -9" in log and "restarted ggml-rpc-server" in log, log
    # The backend's log file is appended to, not replaced: both runs are in it.
    assert node.backend_log().count("Starting RPC server") == 2


# --- Redis goes away: the node carries on, and catches up when it is back ---------------------


def embedded_expiry(state_home: Path) -> list[float]:
    """When each registration in this machine's embedded store expires (read-only)."""
    db = state_home / "corral" / "state.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return [float(row[0]) for row in conn.execute("SELECT expires_at FROM nodes")]


def embedded_heartbeat(node: Node) -> float | None:
    """Last heartbeat of `node` in its own embedded store (read-only: the node owns the file)."""
    db = node.state_home / "corral" / "state.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT body FROM nodes").fetchall()
    for (body,) in rows:
        data = json.loads(body)
        if data["endpoint"] == str(node.endpoint):
            return float(data["last_heartbeat"])
    return None


async def test_node_survives_a_redis_outage_and_registers_again_when_it_is_back(
    start_node: StartNode, redis_server: RedisServer, redis_store: RedisStore
) -> None:
    node = await start_node(redis_server.url)
    await registered(redis_store, node)

    redis_server.stop()
    await until(lambda: "unreachable" in node.log(), 5, "the node warning redis is unreachable")
    assert "WARNING" in node.log() and "working from the embedded store" in node.log()
    # Still beating, into its embedded store: three more beats land there without Redis.
    beats: set[float] = set()

    async def beating() -> bool:
        assert node.child.returncode is None, node.log()
        last = await asyncio.to_thread(embedded_heartbeat, node)
        if last is not None:
            beats.add(last)
        return len(beats) > 3

    await until(beating, 10 * TTL, "three heartbeats into the embedded store without Redis")
    # And its backend still serves.
    assert (await Prober(timeout=1.0).probe(node.endpoint)).status is Status.READY

    redis_server.start()  # same port, empty, as after a crash
    reg = await registered(redis_store, node, seconds=10)
    assert reg.status is Status.READY and reg.restarts == 0
    await until(lambda: "reachable again" in node.log(), 5, "the node saying redis is back")


# --- held by a client: busy, with that client, not offline -------------------------------------


async def test_backend_held_by_a_client_shows_busy_with_that_client(
    start_node: StartNode, redis_server: RedisServer, redis_store: RedisStore, tmp_path: Path
) -> None:
    node = await start_node(redis_server.url)
    await registered(redis_store, node)
    ep = node.endpoint
    holder = socket.create_connection((ep.host, ep.port), timeout=2)
    try:
        holder.sendall(p.encode_hello())
        reply = b""
        while len(reply) < p.SIZE_FIELD + p.HELLO_REPLY_SIZE:
            reply += holder.recv(64)
        client = "{}:{}".format(*holder.getsockname())
        reg = await registered(redis_store, node, lambda r: r.status is Status.BUSY)
        assert reg.client == client
        shown = await backends_json(redis_server.url, "registry", tmp_path / "asker")
        item = shown[str(ep)]
        assert item["status"] == "busy", item
        assert client in item["error"], item
        assert item["sources"] == ["registry"]
        assert item["version"] == "7.0.0" and item["devices"] == [d.to_json() for d in reg.devices]
    finally:
        holder.close()
    await registered(redis_store, node, lambda r: r.status is Status.READY and r.client is None)


# --- poison in Redis: dropped with what and where; the good entry survives ---------------------


async def test_poisoned_redis_keys_are_dropped_with_a_warning_and_the_good_entry_listed(
    rpc_server: StartRpc, redis_server: RedisServer, tmp_path: Path
) -> None:
    good, _ = await rpc_server()
    huge = "x" * (70 * 1024)
    legacy = {
        "rpc_backends": [
            "coordinator:0",
            {"host": "10.9.8.7", "port": 0},
            "127.0.0.9:0",
            {"host": "10.9.8.7", "port": True},
            str(good),
            {"host": good.host, "port": str(good.port)},  # the same one again, older form
        ]
    }
    bad_node = {"node_id": "y", "endpoint": "coordinator:0", "hostname": "h", "status": "ready"}
    client: Redis = Redis.from_url(redis_server.url)
    try:
        await client.set(LEGACY_KEY, json.dumps(legacy))
        await client.set("corral:node:x", b"{not json")
        await client.set("corral:node:y", json.dumps(bad_node))
        # Well formed, but its "busy" names no client address: not believed, probed instead.
        liar = NodeRegistration("liar", good, "h", Status.BUSY, client="coordinator:0")
        await client.set("corral:node:liar", json.dumps(codec.node_to_json(liar)), px=30_000)
        await client.set("corral:node:z", huge)
        await client.hset(
            "corral:backends",
            mapping={
                "10.0.0.1:50052": "[1, 2",
                "10.0.0.2:50052": json.dumps(
                    {"endpoint": "10.0.0.2:50052", "status": 7, "written_at": time.time()}
                ),
                "10.0.0.3:50052": huge,
            },
        )
    finally:
        await client.aclose()
    me = tmp_path / "asker"

    def check(run: Run, sources: list[str]) -> None:
        assert run.code == 0, run.err
        items = run.json()
        assert [(i["host"], i["port"]) for i in items] == [(good.host, good.port)], items
        assert items[0]["status"] == "ready" and items[0]["sources"] == sources
        warnings = [line for line in run.err.splitlines() if line.startswith("warning:")]
        where = f"redis {redis_server.url} key {LEGACY_KEY}: rpc_backends"
        for i, why in [(0, "placeholder host"), (1, "port 0"), (2, "port 0"), (3, "port")]:
            assert any(f"{where}[{i}]" in w and why in w for w in warnings), (i, run.err)
        assert not any(f"{where}[4]" in w or f"{where}[5]" in w for w in warnings), run.err
        for field, why in [
            ("'10.0.0.1:50052'", "not JSON"),
            ("'10.0.0.2:50052'", "field 'status'"),
            ("'10.0.0.3:50052'", "larger than"),
        ]:
            assert any(f"key corral:backends field {field}" in w and why in w for w in warnings), (
                field,
                run.err,
            )

    run = await corral(
        "backends", "--sources", "cache", "--redis", redis_server.url, "--json",
        env=isolated_env(me),
    )  # fmt: skip
    check(run, ["cache"])

    run = await corral(
        "backends", "--sources", "registry,cache", "--redis", redis_server.url, "--json",
        env=isolated_env(me),
    )  # fmt: skip
    check(run, ["registry", "cache"])
    for key, why in [("x", "not JSON"), ("y", "placeholder host"), ("z", "larger than")]:
        assert f"key corral:node:{key}: " in run.err and why in run.err, (key, run.err)
    assert "registry node liar: field 'client': placeholder host" in run.err, run.err
    assert "probing instead" in run.err
