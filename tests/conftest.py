"""Fixtures only: every test's private state, the llama.cpp binaries and tiny model, real
ggml-rpc-servers and a real redis-server on loopback, each started and stopped by PID.

Binaries come from `corral llama install` (the README's test command runs it). Without them a
test that needs them is skipped with the reason locally, and fails under CI=true; the same holds
for redis-server. Helpers that tests import live in tests/support/.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support")  # helpers' asserts explain themselves too

from corral.endpoint import Endpoint  # noqa: E402
from corral.llama.binaries import BinariesNotFound, LlamaBinaries, find_binaries  # noqa: E402
from corral.llama.supervisor import Child, rpc_server_argv  # noqa: E402
from corral.types import Status  # noqa: E402
from tests.support.loopback import free_port, next_loopback  # noqa: E402
from tests.support.redis_server import REDIS_SERVER, RedisServer  # noqa: E402
from tests.support.rpc_backends import StartRpc, wait_status  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test (and every corral process it starts) gets its own state and config
    directories: no test reads or writes the user's store. The cache (llama.cpp build) is kept."""
    root = tmp_path_factory.mktemp("xdg")
    for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(name, str(root / name.lower()))
    # rpc-server -c (on by default in `corral node`) writes here, not in the user's home.
    monkeypatch.setenv("LLAMA_CACHE", str(root / "llama_cache"))
    for name in ("CORRAL_REDIS_URL", "SOLLOL_REDIS_URL", "CORRAL_BACKENDS_FILE", "CORRAL_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Nor the machine's corral.toml (/etc/corral) or one named by CORRAL_CONFIG.
    monkeypatch.setenv("CORRAL_SYSTEM_CONFIG_DIR", str(root / "etc_corral"))
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    return root


@pytest.fixture(scope="session")
def llama_bins() -> LlamaBinaries:
    try:
        return find_binaries()
    except BinariesNotFound as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the llama.cpp binaries: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corral.llama.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
async def rpc_server(llama_bins: LlamaBinaries, tmp_path: Path) -> AsyncIterator[StartRpc]:
    """Factory: `ep, child = await rpc_server()` starts a real ggml-rpc-server, waits ready."""
    children: list[Child] = []

    async def start(host: str | None = None, port: int | None = None) -> tuple[Endpoint, Child]:
        host = host or next_loopback()
        port = port or free_port(host)
        ep = Endpoint(host, port)
        child = Child(
            rpc_server_argv(llama_bins.rpc_server, host, port, threads=1),
            tmp_path / f"rpc-{host}-{port}.log",
        )
        await child.start()
        children.append(child)
        await wait_status(ep, Status.READY)
        return ep, child

    yield start
    for child in children:
        await child.stop(grace=3)


@pytest.fixture
def loopback_host() -> Iterator[str]:
    yield next_loopback()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, empty, stopped by PID at the end."""
    if not os.access(REDIS_SERVER, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {REDIS_SERVER}")
        pytest.skip(f"{REDIS_SERVER} not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
