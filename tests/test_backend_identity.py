"""One backend, one name: every name is resolved to the address it reaches before it is merged,
used or shown, so no rpc-server (which serves one client at a time) is ever used twice, and
`--rpc` carries only forms this llama-server parses.

Real ggml-rpc-server and llama-server processes throughout, but for one stand-in: a protocol-
correct fake RPC server on [::1], because this build of ggml-rpc-server cannot listen on IPv6
(it binds with inet_addr, IPv4 only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

from corral.discovery import choose, merge
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.server import rpc_argument
from corral.net.identity import identities, one_per_backend
from corral.sources.base import SourceReport
from corral.store.base import EventKind
from corral.types import CoordinatorState, ProbeResult, Sighting, SourceName, Status
from tests.support import fake_servers
from tests.support.coordinator import chat, running
from tests.support.corral_cli import corral, isolated_env
from tests.support.fake_servers import fake_server
from tests.support.rpc_backends import StartRpc

P = 50052
ADDR, NAME = Endpoint("127.0.0.1", P), Endpoint("localhost", P)


def report(source: SourceName, *eps: Endpoint) -> SourceReport:
    r = SourceReport(source)
    r.sightings.extend(Sighting(ep, source) for ep in eps)
    return r


def test_two_names_of_one_address_merge_into_one_backend_under_the_first_name() -> None:
    reports = [report(SourceName.FILE, NAME), report(SourceName.SCAN, ADDR)]
    [backend] = merge(reports, {NAME: ADDR, ADDR: ADDR})
    assert backend.endpoint == NAME and backend.names == [ADDR]
    assert backend.sources == [SourceName.FILE, SourceName.SCAN]
    backend.probe = ProbeResult(NAME, Status.READY, "7.0.0")
    assert choose(reports, [backend], {NAME: ADDR, ADDR: ADDR}) == (SourceName.FILE, [NAME])
    assert backend.to_json()["names"] == ["127.0.0.1:50052"]


def test_without_an_identity_two_names_stay_two_backends() -> None:
    """A name that did not resolve is its own identity: nothing is merged on a guess."""
    backends = merge([report(SourceName.FILE, NAME, ADDR)], {})
    assert [b.endpoint for b in backends] == [NAME, ADDR]


async def test_a_name_resolves_to_the_ipv4_address_llama_server_would_reach() -> None:
    found = await identities([NAME, ADDR, Endpoint("no-such-host.invalid", P)])
    assert found[NAME] == ADDR and found[ADDR] == ADDR
    assert found[Endpoint("no-such-host.invalid", P)] == Endpoint("no-such-host.invalid", P)
    assert one_per_backend([ADDR, NAME, Endpoint("127.0.0.2", P)], found) == [
        ADDR,
        Endpoint("127.0.0.2", P),
    ]


def test_rpc_carries_each_backend_once_and_refuses_ipv6_with_a_reason() -> None:
    assert rpc_argument([ADDR, Endpoint("gpu1", 1), ADDR]) == "127.0.0.1:50052,gpu1:1"
    with pytest.raises(ValueError, match=r"\[::1\]:1: .*IPv4 only"):
        rpc_argument([ADDR, Endpoint("::1", 1)])


async def test_a_file_naming_one_backend_twice_lists_it_once_with_both_names(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    ep, child = await rpc_server(host="127.0.0.1")
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text(f"127.0.0.1:{ep.port}\nlocalhost:{ep.port}\n[::ffff:127.0.0.1]:{ep.port}\n")
    done = await corral(
        "backends",
        "--json",
        "--sources",
        "file",
        "--backends-file",
        str(conf),
        env=isolated_env(tmp_path / "state"),
    )
    assert done.code == 0, done.err
    [item] = done.json()
    assert (item["host"], item["port"], item["status"]) == ("127.0.0.1", ep.port, "ready")
    assert item["names"] == [f"localhost:{ep.port}"]  # the mapped form is the address itself
    assert child.pid is not None and psutil.pid_exists(child.pid) and child.returncode is None


async def test_a_coordinator_given_two_names_of_one_backend_uses_it_once_and_serves(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    """Before: llama-server got both names, opened a second connection to the one-client
    server, hung until the start timeout, and the rpc-server died of SIGPIPE."""
    ep, child = await rpc_server(host="127.0.0.1")
    named = Endpoint("localhost", ep.port)
    async with running(tmp_path, llama_bins, tiny_model, [ep, named], tensor_split=None) as c:
        rec = await c.wait_serving({ep})
        assert rec.pid is not None
        argv = psutil.Process(rec.pid).cmdline()
        assert argv[argv.index("--rpc") + 1] == str(ep)
        await chat(c.url)
        assert child.returncode is None and child.pid is not None
        assert psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE


@pytest.mark.skipif(sys.platform != "linux", reason="needs the IPv6 loopback")
async def test_an_ipv6_backend_is_named_incompatible_and_never_reaches_rpc(
    llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    """Every IPv6 form makes this llama-server abort ("Failed to parse endpoint"): such a
    backend must be refused, with the reason, before anything starts."""
    async with (
        fake_server(fake_servers.rpc(), host="::1") as server,
        running(
            tmp_path,
            llama_bins,
            tiny_model,
            [Endpoint("::1", server.endpoint.port)],
            tensor_split=None,
            local_fallback=False,
        ) as c,
    ):
        v6 = server.endpoint
        warned = await c.wait_event(
            EventKind.WARNING, where=lambda e: e.endpoint == v6 and "IPv4 only" in e.message
        )
        assert "incompatible" in warned.message and "will not be used" in warned.message
        rec = await c.record()
        assert rec.state is CoordinatorState.WAITING and rec.pid is None


async def test_probe_of_two_names_of_one_backend_probes_it_once(
    rpc_server: StartRpc, tmp_path: Path
) -> None:
    ep, child = await rpc_server(host="127.0.0.1")
    done = await corral(
        "probe", str(ep), f"localhost:{ep.port}", "--json", env=isolated_env(tmp_path / "s")
    )
    assert done.code == 0, done.err
    [item] = done.json()
    assert (item["host"], item["status"], item["names"]) == (
        "127.0.0.1",
        "ready",
        [f"localhost:{ep.port}"],
    )
    assert child.returncode is None
