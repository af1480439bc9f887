"""`corral node --warm MODEL`: the node loads the model into its own backend once, so the
backend's cache holds it, and a coordinator's later load of it hits the cache for every large
tensor instead of sending it.

Real processes: the node agent starts a real ggml-rpc-server with `-c` and warms it with a real
llama-server over loopback; then another real llama-server loads the same model through that
backend. A cache miss makes the backend write a new file (named by the tensor's hash), so the
files after the real load are exactly the ones the warm-up wrote. The cache directory is
LLAMA_CACHE under the test's tmp (conftest).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.model_shape import shape_for_size
from corral.llama.tiny_model import write_tiny_model
from corral.node.agent import NodeAgent
from corral.node.warm import WARM_CTX, warm_argv
from tests.support.corral_cli import corral, isolated_env
from tests.support.llama_server import running_llama_server
from tests.support.node_agents import cached_node

HEARTBEAT = 0.25
MiB = 1024**2


def test_the_warm_up_leaves_the_layers_to_llama_servers_fit() -> None:
    argv = warm_argv(Path("/b/llama-server"), Path("/m.gguf"), Endpoint("10.0.0.2", 50052), 9)
    assert argv[argv.index("--rpc") + 1] == "10.0.0.2:50052"
    assert argv[argv.index("-c") + 1] == str(WARM_CTX)
    assert "-ngl" not in argv  # an explicit one would abort a model larger than the backend
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


@pytest.fixture(scope="module")
def model_128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = shape_for_size(128 * MiB)  # its feed-forward tensors pass 10 MiB
    return write_tiny_model(tmp_path_factory.mktemp("model") / "m128.gguf", shape=shape)


@pytest.fixture
async def warming_agent(
    llama_bins: LlamaBinaries, model_128: Path, tmp_path: Path
) -> AsyncIterator[NodeAgent]:
    async with cached_node(
        llama_bins, tmp_path, None, heartbeat_s=HEARTBEAT, warm=model_128
    ) as agent:
        yield agent


@pytest.mark.llama
async def test_a_warmed_backend_serves_a_later_load_from_its_cache(
    warming_agent: NodeAgent, llama_bins: LlamaBinaries, model_128: Path, tmp_path: Path
) -> None:
    agent = warming_agent
    where = Path(os.environ["LLAMA_CACHE"]) / "rpc"
    await asyncio.wait_for(agent.warm_done.wait(), 120)
    warmed = agent.warmed
    assert warmed is not None, "the warm-up failed (see the node's warm log)"
    assert warmed.after.bytes > warmed.before.bytes
    after_warm = {f.name: f.stat().st_size for f in where.iterdir()}
    assert after_warm and sum(after_warm.values()) >= 10 * MiB
    # The warm-up's llama-server is gone: the backend takes another client.
    async with running_llama_server(
        llama_bins, model_128, tmp_path, rpc_flag=[agent.config.endpoint], start_s=60
    ):
        pass
    after_load = {f.name: f.stat().st_size for f in where.iterdir()}
    assert after_load == after_warm, "the real load missed the cache for some tensor"


async def test_warm_needs_the_cache_and_a_model_that_is_there(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    run = await corral("node", "--no-cache", "--warm", str(tmp_path / "m.gguf"), env=env)
    assert run.code == 2 and "--warm fills the backend's cache: it needs --cache" in run.err
    run = await corral("node", "--warm", str(tmp_path / "missing.gguf"), env=env)
    assert run.code == 2 and "missing.gguf" in run.err, run.err
