"""Shared fixtures: real llama.cpp processes on loopback, started and stopped by PID.

Binaries come from `corral llama install` (the README's test command runs it). Without them a
test that needs them is skipped with the reason locally, and fails under CI=true.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import BinariesNotFound, LlamaBinaries, find_binaries
from corral.llama.supervisor import Child, rpc_server_argv
from corral.rpc.probe import Prober
from corral.types import Status

# Each test gets its own loopback addresses (127.0.0.0/8 is all ours), so tests never collide.
_addresses = itertools.count(10)


def next_loopback() -> str:
    n = next(_addresses)
    return f"127.0.{(n // 250) % 250 + 1}.{n % 250 + 2}"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def isolated_state(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test (and every corral process it starts) gets its own state and config
    directories: no test reads or writes the user's store. The cache (llama.cpp build) is kept."""
    root = tmp_path_factory.mktemp("xdg")
    for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(name, str(root / name.lower()))
    for name in ("CORRAL_REDIS_URL", "SOLLOL_REDIS_URL", "CORRAL_BACKENDS_FILE", "CORRAL_TOKEN"):
        monkeypatch.delenv(name, raising=False)
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


async def wait_status(ep: Endpoint, want: Status, seconds: float = 10.0) -> None:
    prober = Prober(timeout=1.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    last = None
    while loop.time() < deadline:
        last = await prober.probe(ep)
        if last.status is want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{ep} never became {want}; last: {last}")


StartRpc = Callable[..., Awaitable[tuple[Endpoint, Child]]]


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
