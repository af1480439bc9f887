"""rpc-server's tensor cache, on by default under `corral node`, and its size in the heartbeat.

Real processes: `corral node` starts a real ggml-rpc-server with `-c` (read from its
/proc cmdline) unless `--no-cache`; a real llama-server loads a 128 MiB random model (weights
over the 10 MiB threshold) across two real backends, one run by the node agent, and answers a
chat completion; then the agent's heartbeat reports the bytes the backend cached. The cache
directory is LLAMA_CACHE under the test's tmp (conftest), never the user's home.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.model_shape import shape_for_size
from corral.llama.rpc_cache import CacheGauge, CacheUsage, measure, rpc_cache_dir, uses_cache
from corral.llama.supervisor import Child
from corral.llama.tiny_model import write_tiny_model
from corral.node.agent import NodeAgent
from corral.store.base import NodeRegistration
from corral.store.codec import CodecError, node_from_json, node_to_json
from corral.store.sqlite import EmbeddedStore
from corral.types import Status
from corral.web.schemas import HeartbeatIn
from tests.support.clock import FakeClock
from tests.support.corral_cli import corral_script, isolated_env
from tests.support.llama_server import running_llama_server
from tests.support.loopback import free_port, next_loopback
from tests.support.node_agents import cached_node
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

HEARTBEAT = 0.25

# --- where the cache is, and its size ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"LLAMA_CACHE": "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/c/rpc"),
        ({"LLAMA_CACHE": "", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/llama.cpp/rpc"),
        ({"XDG_CACHE_HOME": "", "HOME": "/h"}, "/h/.cache/llama.cpp/rpc"),
        ({}, "/acct/.cache/llama.cpp/rpc"),
    ],
)
def test_cache_directory_follows_rpc_servers_rules(env: dict[str, str], want: str) -> None:
    assert rpc_cache_dir(env, home="/acct", platform="linux") == Path(want)


def test_cache_flag_is_read_from_a_command_line() -> None:
    assert uses_cache(["ggml-rpc-server", "-p", "1", "-c"])
    assert uses_cache(["rpc-server", "--cache"])
    assert not uses_cache(["ggml-rpc-server", "-p", "1"])
    assert not uses_cache(["-c"])  # argv[0] is the program, not a flag


def test_the_walk_is_bounded_and_says_at_least(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"{i:016x}").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(b"y" * 7)
    assert measure(tmp_path) == CacheUsage(3007, 31)
    capped = measure(tmp_path, max_files=10)
    assert capped.capped and capped.files <= 10 and capped.bytes == 100 * capped.files
    assert capped.describe().startswith("at least ")
    assert measure(tmp_path / "missing") == CacheUsage(0, 0)


async def test_the_gauge_walks_at_most_once_per_refresh_period(tmp_path: Path) -> None:
    clock = FakeClock()
    walks: list[float] = []

    def walk(directory: Path, max_files: int) -> CacheUsage:
        walks.append(clock())
        return measure(directory, max_files)

    gauge = CacheGauge(tmp_path, refresh_s=30, clock=clock, walk=walk)
    assert await gauge.measure_now() == CacheUsage(0, 0)
    (tmp_path / "a").write_bytes(b"z" * 10)
    clock.advance(29.9)
    gauge.refresh()
    await gauge.close()
    assert len(walks) == 1 and gauge.usage == CacheUsage(0, 0)  # too soon: the old measure
    clock.advance(0.1)
    gauge.refresh()
    gauge.refresh()  # one walk at a time
    await gauge.close()
    assert len(walks) == 2 and gauge.usage == CacheUsage(10, 1)


def test_registrations_carry_the_cache_and_old_ones_still_read() -> None:
    reg = NodeRegistration(
        node_id="n1",
        endpoint=Endpoint("127.0.0.1", 50052),
        hostname="h",
        status=Status.READY,
        cache_dir="/c/rpc",
        cache_bytes=123,
        cache_capped=True,
    )
    obj = node_to_json(reg)
    back = node_from_json(obj, "test")
    assert (back.cache_dir, back.cache_bytes, back.cache_capped) == ("/c/rpc", 123, True)
    old = {k: v for k, v in obj.items() if not k.startswith("cache_")}
    assert node_from_json(old, "test").cache_bytes is None
    with pytest.raises(CodecError, match="cache_bytes"):
        node_from_json({**obj, "cache_bytes": -1}, "test")
    assert HeartbeatIn.model_validate(obj).to_registration(0.0).cache_bytes == 123
    odd = HeartbeatIn.model_validate({**obj, "cache_dir": "/c\n\x01/rpc"})
    assert odd.to_registration(0.0).cache_dir == "/c\ufffd\ufffd/rpc"  # shown, not refused


# --- `corral node` passes -c unless told not to ------------------------------------------------


async def backend_of(node: Child, seconds: float = 15) -> psutil.Process:
    found: list[psutil.Process] = []

    def started() -> bool:
        if node.returncode is not None:
            raise AssertionError(f"corral node exited {node.returncode}: {node.log_tail()}")
        assert node.pid is not None
        found[:] = [p for p in psutil.Process(node.pid).children() if p.name() == "ggml-rpc-server"]
        return bool(found) and "heartbeat every" in node.log_tail(50)

    await until(started, seconds, "corral node's backend and its start line")
    return found[0]


@pytest.mark.llama
@pytest.mark.parametrize("cache", [True, False])
async def test_corral_node_turns_the_backend_cache_on_by_default(
    llama_bins: LlamaBinaries, tmp_path: Path, cache: bool
) -> None:
    host = next_loopback()
    argv = [corral_script(), "node", "--host", host, "--port", str(free_port(host)),
            "--heartbeat", str(HEARTBEAT), "--threads", "1", "--no-mdns",
            *([] if cache else ["--no-cache"])]  # fmt: skip
    node = Child(argv, tmp_path / "node.log", env=isolated_env(tmp_path / "state"))
    await node.start()
    try:
        backend = await backend_of(node)
        cmdline = (await asyncio.to_thread(Path(f"/proc/{backend.pid}/cmdline").read_bytes)).split(
            b"\0"
        )
        where = Path(os.environ["LLAMA_CACHE"]) / "rpc"
        line = node.log_tail(50)
        if cache:
            assert b"-c" in cmdline, cmdline
            assert f"cache {where} (0.0 MiB in 0 files)" in line, line
            assert where.is_dir()  # rpc-server made it: it uses this directory
        else:
            assert b"-c" not in cmdline, cmdline
            assert "cache off" in line, line
    finally:
        await node.stop(grace=5)


# --- a real load fills the cache, and the heartbeat says so ------------------------------------


@pytest.fixture(scope="module")
def model_128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = shape_for_size(128 * 1024**2)
    return write_tiny_model(tmp_path_factory.mktemp("model") / "m128.gguf", shape=shape)


@pytest.fixture
async def cached_agent(
    llama_bins: LlamaBinaries, tmp_path: Path
) -> AsyncIterator[tuple[NodeAgent, EmbeddedStore]]:
    store = await EmbeddedStore.open(tmp_path / "state.db")
    try:
        async with cached_node(llama_bins, tmp_path, store, heartbeat_s=HEARTBEAT) as agent:
            yield agent, store
    finally:
        await store.close()


async def registration(
    store: EmbeddedStore, ep: Endpoint, want: str, check: Callable[[NodeRegistration], bool]
) -> None:
    last: list[NodeRegistration] = []

    async def matches() -> bool:
        last[:] = [n for n in await store.live_nodes() if n.endpoint == ep]
        return bool(last) and check(last[0])

    try:
        await until(matches, 30, want)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last: {last}") from None


def chat(serve: Endpoint) -> dict[str, object]:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    request = urllib.request.Request(
        f"http://{serve}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as reply:
        result: dict[str, object] = json.loads(reply.read())
        return result


@pytest.mark.llama
async def test_a_real_load_fills_the_cache_and_the_heartbeat_reports_it(
    cached_agent: tuple[NodeAgent, EmbeddedStore],
    rpc_server: StartRpc,
    llama_bins: LlamaBinaries,
    model_128: Path,
    tmp_path: Path,
) -> None:
    agent, store = cached_agent
    ep = agent.config.endpoint
    where = Path(os.environ["LLAMA_CACHE"]) / "rpc"
    await registration(
        store,
        ep,
        "an empty cache, ready",
        lambda r: r.status is Status.READY and r.cache_bytes == 0 and r.cache_dir == str(where),
    )
    other, _ = await rpc_server()
    async with running_llama_server(
        llama_bins,
        model_128,
        tmp_path,
        rpc_flag=[ep, other],
        extra=["--tensor-split", "1,1"],
        start_s=60,
    ) as (_, serve):
        answer = await asyncio.to_thread(chat, serve)
        assert answer["choices"], answer
        await registration(
            store,
            ep,
            "the cache's bytes in the heartbeat",
            lambda r: (r.cache_bytes or 0) > 10 * 1024**2 and not r.cache_capped,
        )
    files = list(where.iterdir())
    assert files and all(len(f.name) == 16 for f in files)  # one file per tensor, by hash
    on_disk = sum(f.stat().st_size for f in files)
    await registration(store, ep, "exactly what is on disk", lambda r: r.cache_bytes == on_disk)
