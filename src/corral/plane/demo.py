"""The main job: a working local cluster in one command.

Two local backends (supervised ggml-rpc-servers), the discovery chain finding them, then the whole
control plane in this process (dashboard, monitor, coordinator over both backends with the tiny
model), a first chat completion through the dashboard's /v1, and the page's address. It runs
until Ctrl-C (or, with `once`, ends after the first answer).

It tells a person what happens through a DemoOutput (`corral demo` passes rich-backed callables).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from corral.discovery import Discovery
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.probing import prober_for
from corral.llama.server import ServerOptions
from corral.llama.split import parse_tensor_split
from corral.llama.supervisor import Child, rpc_server_argv
from corral.paths import state_dir
from corral.plane.plane import (
    CoordinatorPlan,
    Plane,
    PlaneConfig,
    PlaneError,
    WatchPlan,
    run_plane,
    stop_on_signals,
)
from corral.rpc.probe import Prober
from corral.sources.chain import ChainOptions, build_chain
from corral.types import Backend, SourceName, Status

DEMO_BACKENDS = (Endpoint("127.0.0.45", 50052), Endpoint("127.0.0.46", 50052))
DEMO_DEAD = Endpoint("127.0.0.47", 50052)  # listed in the file, nothing runs there
DEMO_CIDR = "127.0.0.40/29"
SERVE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class DemoPorts:
    dashboard: int = 8080
    coordinator: int = 18080


@dataclass(frozen=True, slots=True)
class DemoOutput:
    """How the demo tells a person what happens: every text is plain (never markup)."""

    say: Callable[[str], None]  # one line
    stress: Callable[[str, str], None]  # one line: a lead, then the part to stand out
    error: Callable[[str], None]
    backends: Callable[[Sequence[Backend], str], None]  # a table of backends, with its title
    log: Callable[[str], None]  # the control plane's progress lines
    warn: Callable[[str], None]  # the control plane's warnings


def _taken(host: str, port: int) -> bool:
    """Does something listen there? (SO_REUSEADDR: a closed socket's TIME_WAIT is no owner.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _ports_in_use(ports: DemoPorts) -> list[str]:
    wanted = [
        ("dashboard", Endpoint("127.0.0.1", ports.dashboard), "--dashboard-port"),
        ("coordinator", Endpoint("127.0.0.1", ports.coordinator), "--coordinator-port"),
        *(("backend", ep, "") for ep in DEMO_BACKENDS),
    ]
    problems = []
    for what, ep, option in wanted:
        if _taken(ep.host, ep.port):
            hint = f"; choose another with {option}" if option else " (an earlier demo?)"
            problems.append(f"{ep} (for the {what}) is already in use{hint}")
    return problems


async def _wait_ready(prober: Prober, ep: Endpoint, child: Child, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and child.returncode is None:
        if (await prober.probe(ep)).status is Status.READY:
            return child.returncode is None  # ours answered, not someone else's
        await asyncio.sleep(0.1)
    return False


async def _start_backends(binaries: LlamaBinaries, out: DemoOutput, logs: Path) -> list[Child]:
    children: list[Child] = []
    prober = Prober(timeout=1.0)
    for ep in DEMO_BACKENDS:
        child = Child(
            rpc_server_argv(binaries.rpc_server, ep.host, ep.port), logs / f"{ep.host}.log"
        )
        children.append(child)  # before start(): the caller stops every one it was given
        await child.start()
        if not await _wait_ready(prober, ep, child, 10):
            raise PlaneError(f"backend {ep} did not come up; its log:\n{child.log_tail()}")
        out.say(f"started ggml-rpc-server pid {child.pid} on {ep}")
    return children


async def _show_discovery(out: DemoOutput, conf: Path) -> None:
    """The chain as `corral backends` shows it: a file with one live and one dead entry, and a
    scan that finds the second backend too."""
    await asyncio.to_thread(
        conf.write_text,
        "# demo backends file\n"
        f"{DEMO_BACKENDS[0]}\n"
        f"{DEMO_DEAD}   # listed, but nothing runs here\n",
    )
    out.say(
        f"backends file lists {DEMO_BACKENDS[0]} and {DEMO_DEAD}; "
        f"scanning {DEMO_CIDR} on port 50052"
    )
    out.say("")
    prober = Prober(timeout=1.0)
    options = ChainOptions(backends_file=str(conf), cidrs=[DEMO_CIDR])
    chain = build_chain([SourceName.FILE, SourceName.SCAN], options, prober)
    result = await Discovery(chain, prober).run()
    out.backends(result.backends, "corral backends")
    found = {b.endpoint for b in result.backends if b.probe and b.probe.status is Status.READY}
    if not set(DEMO_BACKENDS) <= found:
        raise PlaneError("the demo backends were not all found ready")


def _plane_config(
    binaries: LlamaBinaries, state: Path, conf: Path, model: Path, ports: DemoPorts, token: str
) -> PlaneConfig:
    return PlaneConfig(
        state=state,
        watch=WatchPlan(
            [SourceName.FILE, SourceName.SCAN],
            ChainOptions(backends_file=str(conf), cidrs=[DEMO_CIDR]),
        ),
        port=ports.dashboard,
        token=token,
        coordinator=CoordinatorPlan(
            model=model,
            llama_server=binaries.llama_server,
            # 1,1: the tiny model would otherwise fit on one backend and use only that one.
            server=ServerOptions(port=ports.coordinator, tensor_split=parse_tensor_split("1,1")),
        ),
        environ={},  # the demo keeps its own embedded store, never a shared Redis
    )


async def _serving(plane: Plane, task: asyncio.Task[None]) -> bool:
    """True once llama-server serves on both demo backends; False if the plane stopped first
    (asked to: Ctrl-C); raises what ended it otherwise."""
    runner = plane.runner
    assert runner is not None
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while not task.done():
        rec = runner.publish.record
        if rec.state == "serving" and set(rec.backends) == set(DEMO_BACKENDS):
            return True
        if time.monotonic() > deadline:
            raise PlaneError(f"the coordinator did not serve within {SERVE_TIMEOUT_S:g} s")
        await asyncio.sleep(0.1)
    await task
    return False


def printable(text: str) -> str:
    """Pure: the tiny model's random bytes, safe for a terminal (controls shown as ·)."""
    return "".join(c if c.isprintable() else "·" for c in text)


async def _first_answer(out: DemoOutput, dashboard: str, token: str) -> None:
    url = f"{dashboard}/v1/chat/completions"
    # ignore_eos: random weights may pick the end token at once; the demo shows a full answer.
    body = {
        "messages": [{"role": "user", "content": "Hello, cluster!"}],
        "max_tokens": 24,
        "ignore_eos": True,
    }
    out.say(f"asking through the dashboard: POST {url}")
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        reply = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    if reply.status_code != 200:
        raise PlaneError(f"chat completion failed: {reply.status_code} {reply.text[:200]}")
    data = reply.json()
    answer = printable(data["choices"][0]["message"]["content"] or "")
    tokens = data.get("usage", {}).get("completion_tokens")
    out.stress(f"answer ({tokens} tokens): ", repr(answer))
    out.say(
        "  (nonsense, as it should be: the tiny model's weights are random; it proves the "
        "machinery, offload over RPC to both backends, not the words)"
    )


async def run_demo(
    binaries: LlamaBinaries, out: DemoOutput, once: bool, ports: DemoPorts | None = None
) -> int:
    ports = ports or DemoPorts()
    problems = _ports_in_use(ports)
    if problems:
        for problem in problems:
            out.error(problem)
        return 1
    state = state_dir() / "demo"
    stop = asyncio.Event()
    stop_on_signals(stop)
    children: list[Child] = []
    plane_task: asyncio.Task[None] | None = None
    try:
        children = await _start_backends(binaries, out, state)
        conf = state / "rpc_backends.conf"
        await _show_discovery(out, conf)
        from corral.llama.tiny_model import write_tiny_model

        model = await asyncio.to_thread(write_tiny_model, state / "tiny.gguf")
        out.say(f"model: {model} (tiny, random weights: it answers nonsense)")
        token = os.environ.get("CORRAL_TOKEN") or secrets.token_urlsafe(18)
        source = "from CORRAL_TOKEN" if os.environ.get("CORRAL_TOKEN") else "generated"
        out.say(f"token ({source}): {token}")

        ready: asyncio.Future[Plane] = asyncio.get_running_loop().create_future()
        cfg = _plane_config(binaries, state, conf, model, ports, token)
        plane_task = asyncio.create_task(
            run_plane(
                cfg,
                prober_for(binaries),
                stop,
                say=out.log,
                warn=out.warn,
                on_ready=ready.set_result,
            )
        )
        first: set[asyncio.Future[Any]] = {ready, plane_task}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # the plane ended before it was up: raises why, unless Ctrl-C
            await plane_task
            return 0
        plane = ready.result()
        out.say(f"dashboard up at {plane.dashboard_url}/; waiting for the coordinator")
        if not await _serving(plane, plane_task):
            return 0
        await _first_answer(out, plane.dashboard_url, token)
        out.say("")
        out.stress("", f"open the dashboard: {plane.dashboard_url}/")
        if once:
            return 0
        out.say("everything keeps running; Ctrl-C stops it all")
        await stop.wait()
        return 0
    except PlaneError as exc:
        out.error(str(exc))
        return exc.code
    finally:
        stop.set()
        if plane_task is not None:
            with contextlib.suppress(PlaneError):
                await plane_task
        for child in children:
            await child.stop()
