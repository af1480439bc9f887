"""Source `process`: the backends running llama-server coordinators were started with."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.processes import (
    DEFAULT_SERVER_PORT,
    Coordinator,
    find_coordinators,
    is_llama_server,
    parse_coordinator,
)
from corral.rpc.probe import Prober
from corral.sources.process import ProcessSource
from corral.types import SourceName, Status
from tests.support.llama_server import running_llama_server
from tests.support.rpc_backends import StartRpc

A, B, C = Endpoint("10.0.0.1", 50052), Endpoint("10.0.0.2", 50053), Endpoint("::1", 50054)
SERVER = "/opt/llama/bin/llama-server"


def coord(argv: list[str], env: dict[str, str] | None = None) -> Coordinator:
    return parse_coordinator(42, argv, env or {})


def test_rpc_flag_with_space() -> None:
    c = coord([SERVER, "-m", "m.gguf", "--rpc", "10.0.0.1:50052,10.0.0.2:50053"])
    assert c.backends == (A, B)
    assert c.errors == ()
    assert c.model == "m.gguf"


def test_rpc_flag_with_equals() -> None:
    c = coord([SERVER, "--rpc=10.0.0.1:50052,[::1]:50054"])
    assert c.backends == (A, C)


def test_rpc_from_environment() -> None:
    c = coord([SERVER, "-m", "m.gguf"], {"LLAMA_ARG_RPC": "10.0.0.2:50053"})
    assert c.backends == (B,)


def test_environment_and_every_flag_are_all_used() -> None:
    # What llama-server really does (checked with --list-devices): LLAMA_ARG_RPC's devices, then
    # those of each --rpc, despite its warnings that the flag overwrites and the last one wins.
    c = coord(
        [SERVER, "--rpc", "10.0.0.2:50053", "--rpc=[::1]:50054,10.0.0.2:50053"],
        {"LLAMA_ARG_RPC": "10.0.0.1:50052"},
    )
    assert c.backends == (A, B, C)


def test_bad_items_are_reported_with_pid_and_origin_good_ones_kept() -> None:
    c = coord(
        [SERVER, "--rpc", "10.0.0.1:50052,coordinator:0"],
        {"LLAMA_ARG_RPC": "10.0.0.2:0"},
    )
    assert c.backends == (A,)
    assert c.errors == (
        "llama-server pid 42 LLAMA_ARG_RPC item 1: port 0 is a placeholder, not a listening "
        "port: '10.0.0.2:0'",
        "llama-server pid 42 --rpc item 2: placeholder host, not a backend: 'coordinator:0'",
    )


def test_no_rpc_at_all() -> None:
    c = coord([SERVER, "-m", "m.gguf"])
    assert c.backends == () and c.errors == ()


def test_dangling_rpc_flag_is_ignored() -> None:
    assert coord([SERVER, "--rpc"]).backends == ()


def test_serving_address_from_flags_env_and_defaults() -> None:
    c = coord([SERVER])
    assert (c.host, c.port) == ("127.0.0.1", DEFAULT_SERVER_PORT)
    c = coord([SERVER], {"LLAMA_ARG_HOST": "0.0.0.0", "LLAMA_ARG_PORT": "9001"})
    assert (c.host, c.port) == ("0.0.0.0", 9001)
    # The command line overrides the environment; the last flag wins.
    c = coord(
        [SERVER, "--port", "9002", "--host", "10.0.0.9", "--port=9003"], {"LLAMA_ARG_PORT": "1"}
    )
    assert (c.host, c.port) == ("10.0.0.9", 9003)


def test_serving_address_brackets_ipv6() -> None:
    assert coord([SERVER, "--host", "::1", "--port", "9000"]).serving == "[::1]:9000"
    assert coord([SERVER, "--host", "10.0.0.9"]).serving == "10.0.0.9:8080"


@pytest.mark.parametrize("port", ["http", "70000", "-5"])
def test_bad_serving_port_is_reported(port: str) -> None:
    c = coord([SERVER, "--port", port])
    assert c.port == DEFAULT_SERVER_PORT
    assert len(c.errors) == 1 and c.errors[0].startswith("llama-server pid 42: --port")


@pytest.mark.parametrize(
    ("argv", "name", "expected"),
    [
        (["/usr/local/bin/llama-server", "-m", "x"], "llama-server", True),
        (["./llama-server"], None, True),
        (["llama-server"], "something", True),
        ([], "llama-server", True),  # argv hidden from us, name still known
        (["python3", "-c", "print('llama-server')"], "python3", False),
        (["/usr/bin/llama-server-wrapper.sh"], "bash", False),
        (["/x/ggml-rpc-server", "-p", "1"], "ggml-rpc-server", False),
        ([], None, False),
    ],
)
def test_is_llama_server(argv: list[str], name: str | None, expected: bool) -> None:
    assert is_llama_server(argv, name) is expected


# --- real llama-server processes ---------------------------------------------------------------


@pytest.mark.llama
async def test_real_llama_servers_flag_and_env_are_both_found(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _), (c, _) = [await rpc_server() for _ in range(3)]
    async with (
        running_llama_server(llama_bins, tiny_model, tmp_path, rpc_flag=[a, b]) as (flag, fserve),
        running_llama_server(llama_bins, tiny_model, tmp_path, rpc_env=[c], port_in_env=True) as (
            env,
            eserve,
        ),
    ):
        found = {co.pid: co for co in find_coordinators()}
        assert flag.pid in found and env.pid in found
        by_flag, by_env = found[flag.pid], found[env.pid]
        assert by_flag.backends == (a, b) and by_flag.errors == ()
        assert (by_flag.host, by_flag.port) == (fserve.host, fserve.port)
        assert by_env.backends == (c,) and by_env.errors == ()
        assert (by_env.host, by_env.port) == (eserve.host, eserve.port)
        assert by_flag.model == str(tiny_model)

        report = await ProcessSource().collect()
        assert report.source is SourceName.PROCESS
        ours = {s.endpoint: s for s in report.sightings if s.endpoint in {a, b, c}}
        assert set(ours) == {a, b, c}
        assert all(s.source is SourceName.PROCESS for s in ours.values())
        assert ours[a].detail == f"llama-server pid {flag.pid} on {fserve}"
        assert ours[c].detail == f"llama-server pid {env.pid} on {eserve}"
    # Stopped by PID: gone from the process source.
    after = {co.pid for co in find_coordinators()}
    assert flag.pid not in after and env.pid not in after


@pytest.mark.llama
async def test_real_llama_server_uses_env_and_flag_backends_together(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    (d, _), (e, _) = [await rpc_server() for _ in range(2)]
    async with running_llama_server(
        llama_bins, tiny_model, tmp_path, rpc_env=[d], rpc_flag=[e]
    ) as (child, _):
        (found,) = [co for co in find_coordinators() if co.pid == child.pid]
        assert found.backends == (d, e)
        # And it really holds both: each is busy, not ready.
        for ep in (d, e):
            assert (await Prober(timeout=0.3).probe(ep)).status is Status.BUSY, ep
