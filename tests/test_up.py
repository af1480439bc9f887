"""`corral up`, `corral dashboard` and `corral demo` as a user runs them: they serve through /v1,
restart only when asked with the token (once, draining first), show a killed backend offline in
seconds, find new backends on a rescan, stop leaving no child behind, and refuse taken ports and
unsafe binds saying why; the monitor and a requested restart agree on what is held.

Real processes on loopback, a private state and config directory, discovery from a backends
file only (never the default chain: it would browse mDNS and scan this machine's networks).
Every process stopped here was started by the test, or by the `corral` process under test, and
is stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from corral.coordinator.policy import Do, Memory, Observation, PolicyConfig, Serving, decide
from corral.discovery import Discovery
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.monitor import Monitor
from corral.plane.control import generation_counters, tokens_per_second
from corral.plane.demo import DEMO_BACKENDS, printable
from corral.rpc.held import HeldBackends
from corral.rpc.probe import Prober
from corral.sources.chain import ChainOptions, build_chain
from corral.store.base import CoordinatorRecord, NodeRegistration
from corral.store.sqlite import EmbeddedStore
from corral.types import CoordinatorState, SourceName, Status
from tests.support.corral_up import Up, children_of, corral_up
from tests.support.loopback import free_port
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import holds_for, until

TOKEN = "up-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True}


def _env(tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    drop = ("CORRAL_REDIS_URL", "SOLLOL_REDIS_URL", "CORRAL_MODEL", "CORRAL_BACKENDS_FILE")
    env = {k: v for k, v in os.environ.items() if k not in drop and k != "CORRAL_TOKEN"}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    if token is not None:
        env["CORRAL_TOKEN"] = token
    return env


async def corral(
    tmp_path: Path, *args: str, token: str | None = TOKEN, seconds: float = 60
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral",
        *args,
        env=_env(tmp_path, token),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    finally:
        if proc.returncode is None:
            proc.kill()  # the process this test started
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _chat(up: Up) -> dict[str, Any]:
    async with up.client() as c:
        reply = await c.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


async def _events(up: Up, kind: str) -> list[dict[str, Any]]:
    return [e for e in await up.get("/api/events?limit=1000") if e["kind"] == kind]


# ---- real processes --------------------------------------------------------------------------


async def test_up_serves_both_backends_and_answers_through_v1(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with corral_up(tmp_path, [a, b], tiny_model, "--tensor-split", "1,1", token=TOKEN) as up:
        coord = await up.wait_serving({a, b})
        assert coord["pid"] and coord["port"] == up.coordinator_port
        listed: dict[str, dict[str, Any]] = {}

        async def both_in_use() -> bool:
            listed.update(await up.backends())
            return set(listed) == {str(a), str(b)} and all(i["in_use"] for i in listed.values())

        await until(both_in_use, 10, "both backends listed in use")
        assert all(item["sources"] == ["file"] for item in listed.values())
        # The llama-server is this process's child, and holds exactly the two backends.
        proc = psutil.Process(coord["pid"])
        assert proc.ppid() == up.proc.pid
        argv = proc.cmdline()
        assert argv[argv.index("--rpc") + 1] == f"{a},{b}"
        reply = await _chat(up)
        assert reply["usage"]["completion_tokens"] > 0
        async with up.client() as c:  # a POST without the token never reaches llama-server
            refused = await c.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 401
        # Its own generation counters give the speed (the proxy's figure would too: both fine).
        await until(lambda: _speed_known(up), 6, "tokens/s in /api/coordinator after an answer")


async def _speed_known(up: Up) -> bool:
    tps = (await up.coordinator())["tokens_per_second"]
    return isinstance(tps, float | int) and tps > 0


async def test_restart_needs_the_token_and_restarts_exactly_once(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with corral_up(tmp_path, [a, b], tiny_model, "--tensor-split", "1,1", token=TOKEN) as up:
        first = await up.wait_serving({a, b})
        async with up.client() as c:
            refused = await c.post("/api/coordinator/restart", json={"reason": "no token"})
            assert refused.status_code == 401
            # Refused before the route ran: no restart job exists to begin later (the dashboard
            # spawns its job before it answers; test_web_api checks that job list directly).
            still = await up.coordinator()
            assert still["pid"] == first["pid"] and still["restarts"] == 0
            accepted = await c.post(
                "/api/coordinator/restart", json={"reason": "test asked"}, headers=AUTH
            )
            assert accepted.status_code == 202, accepted.text

        async def restarted() -> bool:
            now = await up.coordinator()
            return bool(now["state"] == "serving" and now["pid"] != first["pid"])

        await until(restarted, 20, "a new llama-server after the restart")
        second = await up.wait_serving({a, b})
        assert second["restarts"] == 1
        assert second["last_reason"] == "restart requested: test asked"
        assert not _alive(first["pid"])
        events = await _events(up, "coordinator_restarted")
        assert len(events) == 1 and "test asked" in events[0]["message"]
        assert events[0]["data"]["pid"] == second["pid"]
        await _chat(up)

        async def once() -> bool:
            return bool((await up.coordinator())["restarts"] == 1)

        # And no second restart follows: watched over several of the coordinator's looks (from
        # outside its process a window is all there is; load can only make it cover fewer).
        await holds_for(once, 1.0, "exactly one restart")


async def test_killed_backend_is_offline_within_three_seconds(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, b_child) = await rpc_server(), await rpc_server()
    assert b_child.pid is not None
    async with corral_up(tmp_path, [a, b], tiny_model, "--tensor-split", "1,1", token=TOKEN) as up:
        await up.wait_serving({a, b})
        os.kill(b_child.pid, signal.SIGKILL)  # the backend this test started
        killed = time.monotonic()

        async def offline() -> bool:
            return bool((await up.backends())[str(b)]["status"] == "offline")

        await until(offline, 5, f"{b} offline in /api/rpc_backends")
        assert time.monotonic() - killed < 3.0
        # The coordinator goes on without it.
        await up.wait_serving({a})
        await _chat(up)


async def test_rescan_finds_a_backend_added_to_the_file(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    """Discovery runs every 60 s by default: only the rescan can find the new one this soon."""
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with corral_up(tmp_path, [a], tiny_model, "--tensor-split", "1,1", token=TOKEN) as up:
        await up.wait_serving({a})
        assert set(await up.backends()) == {str(a)}
        up.conf.write_text(f"{a}\n{b}\n")
        async with up.client() as c:
            refused = await c.post("/api/rescan")
            assert refused.status_code == 401
            accepted = await c.post("/api/rescan", headers=AUTH)
            assert accepted.status_code == 202

        async def found() -> bool:
            return (await up.backends()).get(str(b), {}).get("status") == "ready"

        await until(found, 5, f"{b} found by the rescan")

        async def completed() -> bool:
            return bool((await up.get("/api/metrics"))["scans"]["completed"] == 1)

        await until(completed, 2, "the rescan counted as completed")
        scans = (await up.get("/api/metrics"))["scans"]
        assert scans["requested"] == 1 and scans["failed"] == 0


async def test_sigterm_stops_everything_and_leaves_no_child(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with corral_up(tmp_path, [a, b], tiny_model, "--tensor-split", "1,1", token=TOKEN) as up:
        coord = await up.wait_serving({a, b})
        children = children_of(up.proc.pid)
        assert coord["pid"] in children
        up.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(up.proc.wait(), 20)
        assert code == 0, up.output()
        left = [pid for pid in children if _alive(pid)]
        assert not left, f"still running after corral up stopped: {left}"
        assert "stopping llama-server" in up.output()
        # The backends it used are free again (and were never harmed): they answer a probe.
        prober = Prober(timeout=1.0)
        for ep in (a, b):
            assert (await prober.probe(ep)).status is Status.READY


async def test_sigkill_of_corral_up_takes_its_llama_server_along(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    """No clean-up runs on SIGKILL: the kernel ends the children (PR_SET_PDEATHSIG)."""
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with corral_up(tmp_path, [a, b], tiny_model, "--tensor-split", "1,1", token=TOKEN) as up:
        coord = await up.wait_serving({a, b})
        children = children_of(up.proc.pid)
        assert coord["pid"] in children
        up.proc.kill()  # the process this test started
        await up.proc.wait()
        await until(lambda: not any(_alive(p) for p in children), 5, "its children gone")


async def test_up_with_the_coordinator_port_taken_exits_1_naming_the_option(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    a, _ = await rpc_server()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        conf = tmp_path / "rpc_backends.conf"
        conf.write_text(f"{a}\n")
        code, out, err = await corral(
            tmp_path, "up", "--port", str(free_port("127.0.0.1")), "--coordinator-port",
            str(taken), "--sources", "file", "--backends-file", str(conf), "--model",
            str(tiny_model), seconds=30,
        )  # fmt: skip
    assert code == 1, out + err
    assert f"127.0.0.1:{taken} is in use" in err and "--coordinator-port" in err


async def _demo(tmp_path: Path, dport: int, cport: int, *args: str) -> tuple[int, str, str]:
    return await corral(
        tmp_path,
        "demo",
        "--dashboard-port",
        str(dport),
        "--coordinator-port",
        str(cport),
        *args,
        token=None,
        seconds=60,
    )


async def _demo_addresses_free() -> None:
    prober = Prober(timeout=0.5)
    for ep in DEMO_BACKENDS:  # the demo's fixed addresses must be ours to use
        if (await prober.probe(ep)).status is not Status.OFFLINE:
            pytest.skip(f"{ep} is in use (a demo running?)")


async def test_demo_runs_until_interrupted_and_leaves_nothing(
    llama_bins: LlamaBinaries, tmp_path: Path
) -> None:
    await _demo_addresses_free()
    dport, cport = free_port("127.0.0.1"), free_port("127.0.0.1")
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corral", "demo", "--dashboard-port", str(dport),
            "--coordinator-port", str(cport), env=_env(tmp_path, None), stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    children: set[int] = set()
    try:
        await until(lambda: "Ctrl-C stops it all" in log.read_text(), 30, "the demo running")
        children = children_of(proc.pid)
        assert len(children) == 3  # two ggml-rpc-servers and a llama-server
        async with httpx.AsyncClient(trust_env=False) as c:
            coord = (await c.get(f"http://127.0.0.1:{dport}/api/coordinator")).json()
        assert coord["state"] == "serving" and coord["pid"] in children
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert await asyncio.wait_for(proc.wait(), 20) == 0, log.read_text()
        assert not [pid for pid in children if _alive(pid)]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


async def test_demo_once_brings_up_a_cluster_and_answers(
    llama_bins: LlamaBinaries, tmp_path: Path
) -> None:
    await _demo_addresses_free()
    dport, cport = free_port("127.0.0.1"), free_port("127.0.0.1")
    code, out, err = await _demo(tmp_path, dport, cport, "--once")
    assert code == 0, out + err
    assert "answer (24 tokens): " in out and "nonsense" in out
    assert f"open the dashboard: http://127.0.0.1:{dport}/" in out
    assert "token (generated): " in out
    assert f"with {DEMO_BACKENDS[0]},{DEMO_BACKENDS[1]}" in out  # both backends in use
    for line in ("127.0.0.45:50052", "127.0.0.47:50052", "corral backends"):
        assert line in out  # the discovery table is still shown
    prober = Prober(timeout=0.5)
    for ep in DEMO_BACKENDS:  # and its backends stopped with it
        assert (await prober.probe(ep)).status is Status.OFFLINE


async def test_demo_says_which_port_is_taken(llama_bins: LlamaBinaries, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        code, out, err = await corral(
            tmp_path, "demo", "--once", "--dashboard-port", str(taken), seconds=30
        )
    assert code == 1
    assert f"127.0.0.1:{taken} (for the dashboard) is already in use" in out + err
    assert "--dashboard-port" in out + err


async def test_up_on_a_taken_port_exits_1_saying_so(tmp_path: Path) -> None:
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text("")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        code, out, err = await corral(
            tmp_path, "dashboard", "--port", str(taken), "--sources", "file",
            "--backends-file", str(conf), seconds=30,
        )  # fmt: skip
    assert code == 1, out + err
    assert f"cannot listen on 127.0.0.1:{taken}" in err


@pytest.mark.parametrize("command", ["up", "dashboard"])
async def test_non_loopback_without_token_exits_2(command: str, tmp_path: Path) -> None:
    code, out, err = await corral(
        tmp_path, command, "--host", "0.0.0.0", "--sources", "file", token=None, seconds=30
    )
    assert code == 2, out + err
    assert "refusing to listen on 0.0.0.0" in err and "CORRAL_TOKEN" in err
    assert "dashboard:" not in out  # nothing was started


# ---- pure pieces -----------------------------------------------------------------------------

A = Endpoint("10.0.0.1", 50052)
B = Endpoint("10.0.0.2", 50052)


def test_requested_restart_drains_then_starts_with_every_ready_backend() -> None:
    cfg = PolicyConfig(debounce_s=10.0)
    mem = Memory(last_set=frozenset({A}))
    # B has been ready for 1 s only: no automatic restart for it yet.
    _, mem = decide(cfg, mem, Observation(0.0, frozenset({B}), Serving(frozenset({A}), 0.0)))
    action, mem = decide(
        cfg, mem, Observation(1.0, frozenset({B}), Serving(frozenset({A}), 0.0), requested="why")
    )
    assert action.do is Do.STOP and action.drain
    assert action.reason == "restart requested: why"
    action, mem = decide(cfg, mem, Observation(1.5, frozenset({A, B})))
    assert action.do is Do.START and action.restart and action.backends == (A, B)
    assert action.reason == "restart requested: why"
    assert not mem.take_ready and mem.reason is None


def test_requested_restart_waives_the_backoff() -> None:
    mem = Memory(last_set=frozenset({A}), failures=4, not_before=100.0)
    action, _ = decide(PolicyConfig(), mem, Observation(10.0, frozenset({A})))
    assert action.do is Do.WAIT
    action, _ = decide(PolicyConfig(), mem, Observation(10.0, frozenset({A}), requested="now"))
    assert action.do is Do.START and action.backends == (A,)


def test_a_lost_backend_wins_over_a_requested_restart() -> None:
    s = Serving(frozenset({A, B}), 0.0, lost={B: "closed"})
    mem = Memory(last_set=frozenset({A, B}))
    action, _ = decide(PolicyConfig(), mem, Observation(1.0, frozenset(), s, requested="x"))
    assert action.do is Do.STOP and not action.drain and "backend lost" in action.reason


async def test_monitor_takes_what_is_held_from_the_runner_not_the_lagging_record(
    tmp_path: Path,
) -> None:
    """After llama-server stops, the record still names its set ("restarting"). A monitor going
    by the record would mark them held in the shared prober, and the runner's own probes of
    the freed backends would answer "busy (not probed)": it would restart without them."""
    store = await EmbeddedStore.open(tmp_path / "state.db")
    try:
        await store.set_coordinator(CoordinatorRecord(CoordinatorState.RESTARTING, (A, B)))
        held = HeldBackends()
        prober = Prober(held=held)

        def nothing() -> Discovery:
            return Discovery([], prober)

        await Monitor(store, prober, nothing, held=held).recheck_once()
        assert set(held) == {A, B}  # no coordinator here: the monitor keeps the record's view
        held.replace({B})  # a runner in this process owns it and holds B alone now
        monitor = Monitor(store, prober, nothing, held=held, runner_owns_held=True)
        await monitor.recheck_once()
        assert set(held) == {B}  # the lagging record did not overwrite the runner's view
        held.replace(())
        await monitor.discover_once()
        assert set(held) == set()
    finally:
        await store.close()


async def test_a_node_that_registers_is_discovered_at_the_next_recheck(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    """A node registering over HTTP must show on the dashboard in seconds, not at the next
    whole discovery (a minute later by default)."""
    ep, _ = await rpc_server()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    held = HeldBackends()
    prober = Prober(timeout=1.0, held=held)
    chain = ChainOptions(store=store)
    monitor = Monitor(
        store,
        prober,
        lambda: Discovery(build_chain([SourceName.REGISTRY], chain, prober), prober),
        recheck_s=0.1,
        discover_s=3600,
        watch_nodes=True,
        held=held,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(monitor.run(stop))
    try:
        await until(lambda: monitor.stats.scans == 1, 5, "the first discovery")
        await store.register_node(NodeRegistration("n1", ep, "b1", Status.READY, heartbeat_s=1))
        # The discovery it brings forward: its view is written before its count moves.
        await asyncio.wait_for(monitor.wait_scan(after=1), 5)
        assert ep in {r.endpoint for r in monitor.view()}
        assert monitor.stats.scans == 2
        # The monitor's view leads its write to the store: wait for the write.
        await until(lambda: _stored(store, ep), 5, "the node's backend in the store")
        listed = {r.endpoint: r for r in await store.backends()}
        assert listed[ep].status is Status.READY and SourceName.REGISTRY in listed[ep].sources
        # Rechecks go on; the same registration brings no new scan.
        rechecks = monitor.stats.rechecks
        await until(lambda: monitor.stats.rechecks >= rechecks + 3, 5, "three more rechecks")
        assert monitor.stats.scans == 2
    finally:
        stop.set()
        await running
        await store.close()


async def _stored(store: EmbeddedStore, ep: Endpoint) -> bool:
    return ep in {r.endpoint for r in await store.backends()}


def test_generation_speed_from_llama_server_counters() -> None:
    text = (
        "# HELP llamacpp:tokens_predicted_total x\n"
        "llamacpp:tokens_predicted_total 16\n"
        "llamacpp:tokens_predicted_seconds_total 0.5\n"
        "llamacpp:predicted_tokens_seconds 32\n"
    )
    now = generation_counters(text)
    assert now == (16.0, 0.5)
    assert tokens_per_second(None, now) == 32.0
    assert tokens_per_second(now, (26.0, 0.6)) == 100.0
    assert tokens_per_second(now, now) is None  # nothing generated since
    assert tokens_per_second(now, (4.0, 0.1)) == 40.0  # counters went back: a new llama-server
    assert generation_counters("llamacpp:requests_processing 0\n") is None


def test_printable_hides_control_characters() -> None:
    assert printable("a\x1b[31mb\n") == "a·[31mb·"
