"""The real `corral` console script, run as a subprocess: exit codes, stderr, the --json contract.

Only loopback is ever probed or scanned here: every command names its endpoints, CIDRs (/32 of a
127.x address) or backends file, and the `process` source (which would pick up every llama-server
on the machine, and probe its backends wherever they are) is left to test_sources_process.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from tests.support import fake_servers
from tests.support.corral_cli import corral
from tests.support.fake_servers import fake_server
from tests.support.loopback import free_port
from tests.support.rpc_backends import StartRpc


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment minus anything that would point Corral elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    env["COLUMNS"] = "200"
    return env


# --- probe ------------------------------------------------------------------------------------


async def test_probe_json_contract_ready_and_offline(
    rpc_server: StartRpc, loopback_host: str, clean_env: dict[str, str]
) -> None:
    ready, _ = await rpc_server()
    dead = Endpoint(loopback_host, free_port(loopback_host))
    run = await corral("probe", str(ready), str(dead), "--json", env=clean_env)
    assert run.code == 0, run.err
    assert run.err == ""
    items = run.json()
    assert [(i["host"], i["port"]) for i in items] == [
        (ready.host, ready.port),
        (dead.host, dead.port),
    ]
    r, d = items
    assert r["status"] == "ready" and r["version"] == "7.0.0" and r["error"] is None
    assert len(r["devices"]) >= 1 and r["devices"][0]["total_bytes"] > 0
    assert r["latency_ms"] > 0
    assert r["sources"] == []
    assert d == {
        "host": dead.host,
        "port": dead.port,
        "status": "offline",
        "version": None,
        "devices": [],
        "latency_ms": None,
        "sources": [],
        "error": "connection refused",
        "names": [],
    }


async def test_probe_json_for_every_other_status(clean_env: dict[str, str]) -> None:
    async with (
        fake_server(fake_servers.rpc((8, 0, 0))) as newer,
        fake_server(fake_servers.silent()) as quiet,
        fake_server(fake_servers.http_eager_server()) as http,
    ):
        run = await corral(
            "probe",
            str(newer.endpoint),
            str(quiet.endpoint),
            str(http.endpoint),
            "--json",
            "--timeout",
            "0.4",
            env=clean_env,
        )
    assert run.code == 0, run.err
    by_port = {i["port"]: i for i in run.json()}
    assert by_port[newer.endpoint.port]["status"] == "incompatible"
    assert by_port[newer.endpoint.port]["version"] == "8.0.0"
    assert by_port[quiet.endpoint.port]["status"] == "busy"
    assert by_port[http.endpoint.port]["status"] == "not-rpc"


async def test_probe_ipv6_endpoint_in_brackets(clean_env: dict[str, str]) -> None:
    async with fake_server(fake_servers.rpc(), host="::1") as server:
        run = await corral("probe", f"[::1]:{server.endpoint.port}", "--json", env=clean_env)
    assert run.code == 0, run.err
    (item,) = run.json()
    assert (item["host"], item["port"], item["status"]) == ("::1", server.endpoint.port, "ready")


async def test_probe_table_shows_what_the_server_sent_literally(
    clean_env: dict[str, str],
) -> None:
    # The note quotes the server's bytes; "[red]" in them must be printed, not taken for markup.
    async with fake_server(fake_servers.banner(b"[red]gotcha[/]\r\n")) as server:
        run = await corral("probe", str(server.endpoint), "--timeout", "0.4", env=clean_env)
    assert run.code == 0, run.err
    assert str(server.endpoint) in run.out
    assert "not-rpc" in run.out
    assert "[red]gotc" in run.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["coordinator:0"], "error: argument 1: placeholder host, not a backend: 'coordinator:0'"),
        (["127.0.0.1:1", "gpu1:0"], "error: argument 2: port 0 is a placeholder"),
        (["gpu1:70000"], "argument 1: port out of range 1-65535: 'gpu1:70000'"),
        (
            ["[fe80::1]:0"],
            "argument 1: port 0 is a placeholder, not a listening port: '[fe80::1]:0'",
        ),
        (["gpu 1:5"], "argument 1: whitespace inside endpoint"),
        (["::1"], "IPv6 addresses need brackets"),
        (["127.0.0.1:1", "--timeout", "0"], "--timeout 0.0: must be more than 0"),
        (["127.0.0.1:1", "--timeout", "61"], "at most 60 seconds"),
    ],
)
async def test_probe_bad_input_exits_2_with_the_reason_on_stderr(
    args: list[str], message: str, clean_env: dict[str, str]
) -> None:
    run = await corral("probe", *args, env=clean_env)
    assert run.code == 2
    assert run.out == ""
    assert message in run.err
    assert run.err.count("\n") == 1, run.err  # one line, however long


async def test_probe_usage_errors_exit_2(clean_env: dict[str, str]) -> None:
    for args in (["probe"], ["probe", "127.0.0.1:1", "--timeout", "soon"], ["frobnicate"]):
        run = await corral(*args, env=clean_env)
        assert run.code == 2, (args, run)
        assert run.out == "" and run.err


# --- discover ---------------------------------------------------------------------------------


async def test_discover_json_finds_the_backend_and_nothing_else(
    rpc_server: StartRpc, loopback_host: str, clean_env: dict[str, str]
) -> None:
    ep, _ = await rpc_server()
    run = await corral(
        "discover",
        "--cidr",
        f"{ep.host}/32",
        "--cidr",
        f"{loopback_host}/32",
        "--port",
        str(ep.port),
        "--port",
        str(free_port(loopback_host)),
        "--json",
        env=clean_env,
    )
    assert run.code == 0, run.err
    items = run.json()
    assert len(items) == 1
    assert (items[0]["host"], items[0]["port"], items[0]["status"]) == (ep.host, ep.port, "ready")
    assert items[0]["sources"] == ["scan"]


async def test_discover_nothing_found_still_exits_0(
    loopback_host: str, clean_env: dict[str, str]
) -> None:
    args = ["discover", "--cidr", f"{loopback_host}/32", "--port", "1"]
    run = await corral(*args, "--json", env=clean_env)
    assert (run.code, run.json()) == (0, [])
    run = await corral(*args, env=clean_env)
    assert run.code == 0 and "none found" in run.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cidr", "127.0.0.0/8"], "pass --allow-large"),
        (["--cidr", "127.0.0.300/32"], "--cidr '127.0.0.300/32'"),
        (["--cidr", "127.0.0.1/32", "--port", "0"], "--port 0: out of range 1-65535"),
        (["--cidr", "127.0.0.1/32", "--port", "65536"], "--port 65536: out of range"),
        (["--cidr", "127.0.0.1/32", "--timeout", "-1"], "must be more than 0"),
    ],
)
async def test_discover_bad_input_exits_2(
    args: list[str], message: str, clean_env: dict[str, str]
) -> None:
    run = await corral("discover", *args, env=clean_env)
    assert run.code == 2
    assert message in run.err
    assert run.out == ""


# --- backends ---------------------------------------------------------------------------------


async def test_backends_json_from_a_file_with_warnings_on_stderr(
    rpc_server: StartRpc, loopback_host: str, clean_env: dict[str, str], tmp_path: Path
) -> None:
    ep, _ = await rpc_server()
    dead = Endpoint(loopback_host, free_port(loopback_host))
    conf = tmp_path / "backends.conf"
    conf.write_text(f"{ep}  # a real one\n{dead}\n10.0.0.1:0\n")
    run = await corral(
        "backends", "--sources", "file", "--backends-file", str(conf), "--json", env=clean_env
    )
    assert run.code == 0, run.err
    items = run.json()
    assert [(i["host"], i["port"], i["status"]) for i in items] == [
        (ep.host, ep.port, "ready"),
        (dead.host, dead.port, "offline"),
    ]
    assert all(i["sources"] == ["file"] for i in items)
    assert f"warning: {conf}:3: port 0 is a placeholder" in run.err


async def test_backends_file_from_environment_and_human_output(
    rpc_server: StartRpc, clean_env: dict[str, str], tmp_path: Path
) -> None:
    ep, _ = await rpc_server()
    conf = tmp_path / "env.conf"
    conf.write_text(f"{ep}\n")
    env = {**clean_env, "CORRAL_BACKENDS_FILE": str(conf)}
    run = await corral("backends", "--sources", "file", env=env)
    assert run.code == 0, run.err
    assert str(ep) in run.out and "ready" in run.out
    assert f"Coordinator set (from source 'file'): {ep}" in run.out


async def test_backends_found_nothing_exits_0(clean_env: dict[str, str], tmp_path: Path) -> None:
    run = await corral("backends", "--sources", "file", "--json", env=clean_env, cwd=tmp_path)
    assert (run.code, run.json()) == (0, [])
    run = await corral("backends", "--sources", "file", env=clean_env, cwd=tmp_path)
    assert run.code == 0
    assert "No live backend" in run.out


async def test_backends_missing_named_file_is_a_warning(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.conf"
    run = await corral(
        "backends", "--sources", "file", "--backends-file", str(missing), "--json", env=clean_env
    )
    assert run.code == 0
    assert run.json() == []
    assert f"{missing}: backends file not found" in run.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sources", "file,bogus"], "--sources: unknown source 'bogus'"),
        (["--sources", "file,file"], "'file' given twice"),
        (["--sources", "scan", "--cidr", "127.0.0.0/8"], "pass --allow-large"),
        (["--sources", "file", "--timeout", "0"], "must be more than 0"),
    ],
)
async def test_backends_bad_input_exits_2(
    args: list[str], message: str, clean_env: dict[str, str]
) -> None:
    run = await corral("backends", *args, env=clean_env)
    assert run.code == 2
    assert message in run.err
    assert run.out == ""


# --- llama ------------------------------------------------------------------------------------


async def test_llama_bin_dir_prints_the_directory_with_the_binaries(
    llama_bins: LlamaBinaries, clean_env: dict[str, str]
) -> None:
    run = await corral("llama", "bin-dir", env=clean_env)
    assert run.code == 0, run.err
    bin_dir = Path(run.out.strip())
    assert bin_dir == llama_bins.bin_dir
    assert (bin_dir / "llama-server").is_file()
    assert (bin_dir / "ggml-rpc-server").is_file() or (bin_dir / "rpc-server").is_file()


async def test_llama_bin_dir_with_an_empty_override_exits_1_saying_why(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = await corral("llama", "bin-dir", env={**clean_env, "CORRAL_LLAMA_BIN_DIR": str(empty)})
    assert run.code == 1
    assert run.out == ""
    assert f"CORRAL_LLAMA_BIN_DIR={empty}" in run.err
    assert "ggml-rpc-server" in run.err and "llama-server" in run.err
    assert "corral llama install" in run.err  # what to do about it
