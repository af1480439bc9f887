"""The scan source: its pure parts, and real scans of an isolated LAN (two network namespaces).

The LAN (see tests/support/netns.py): the scanner in ns A at 198.18.0.1/16; in ns B two ready
ggml-rpc-servers, one held busy by a client that completed HELLO and stays connected, an address
that refuses (held, no listener), a non-RPC server on the RPC port; every other address silent.
Scans run in ns A as separate processes (`ip netns exec`), so they never touch the real network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.supervisor import Child, rpc_server_argv
from corral.net import neighbours as nb
from corral.net.pacing import NeighbourPacer
from corral.sources import scan as sc
from corral.types import ProbeResult, Status
from tests.support.loopback import next_loopback
from tests.support.netns import (
    BENCH_NET,
    Lan,
    can_build_lan,
    helper_argv,
    isolated_lan,
    run_in,
    scan_lines,
    start_in,
    wait_for_line,
    wait_listening,
)

PORT = 50052
CANNOT_BUILD_LAN = can_build_lan()
needs_lan = pytest.mark.skipif(CANNOT_BUILD_LAN is not None, reason=CANNOT_BUILD_LAN or "")


# --- pure parts: no root, no network ---------------------------------------------------------


@pytest.mark.parametrize("text", ["10.0.0.0/33", "not-a-net", "10.0.0.300/24", "", "::1/129"])
def test_parse_cidrs_refuses_malformed_with_the_input_named(text: str) -> None:
    with pytest.raises(sc.ScanError, match="--cidr"):
        sc.parse_cidrs([text], allow_large=False)


def test_parse_cidrs_accepts_host_bits_and_strips() -> None:
    nets = sc.parse_cidrs([" 192.168.1.7/24 ", "10.1.2.3"], allow_large=False)
    assert nets == [ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("10.1.2.3/32")]


def test_networks_larger_than_a_16_need_allow_large() -> None:
    assert sc.parse_cidrs(["10.0.0.0/16"], allow_large=False)
    with pytest.raises(sc.ScanError, match="--allow-large"):
        sc.parse_cidrs(["10.0.0.0/15"], allow_large=False)
    assert sc.parse_cidrs(["10.0.0.0/15"], allow_large=True)[0].num_addresses == 131072
    with pytest.raises(sc.ScanError, match="--allow-large"):
        sc.parse_cidrs(["fd00::/64"], allow_large=False)
    with pytest.raises(sc.ScanError):
        sc.ScanSource(cidrs=["10.0.0.0/8"]).networks()


def test_targets_every_host_on_every_port_once() -> None:
    nets = sc.parse_cidrs(["198.18.0.0/30", "198.18.0.0/30", "198.18.9.9/32"], False)
    got = list(sc.targets(nets, [50052, 50053]))
    assert got == [
        Endpoint("198.18.0.1", 50052),
        Endpoint("198.18.0.1", 50053),
        Endpoint("198.18.0.2", 50052),
        Endpoint("198.18.0.2", 50053),
        Endpoint("198.18.9.9", 50052),
        Endpoint("198.18.9.9", 50053),
    ]
    assert len(list(sc.targets(sc.parse_cidrs(["10.0.0.0/16"], False), [1]))) == 65534


def test_results_sort_by_family_address_port() -> None:
    results = [
        ProbeResult(Endpoint(h, p), Status.READY)
        for h, p in [("::1", 1), ("10.0.0.2", 2), ("10.0.0.10", 1), ("10.0.0.2", 1)]
    ]
    ordered = [str(r.endpoint) for r in sorted(results, key=sc._order)]
    assert ordered == ["10.0.0.2:1", "10.0.0.2:2", "10.0.0.10:1", "[::1]:1"]


def test_targets_leaves_out_swept_parts() -> None:
    nets = sc.parse_cidrs(["198.18.0.0/23"], False)
    skip = [ipaddress.IPv4Network("198.18.0.0/24")]
    hosts = {e.host for e in sc.targets(nets, [1], skip=skip)}
    assert len(hosts) == 255 and min(hosts, key=ipaddress.ip_address) == "198.18.1.0"


def _fake_if_addrs(monkeypatch: pytest.MonkeyPatch) -> None:
    def entry(address: str, netmask: str) -> Any:
        return SimpleNamespace(family=socket.AF_INET, address=address, netmask=netmask)

    fake = {
        "lo": [entry("127.0.0.1", "255.0.0.0")],
        "eth0": [entry("192.168.7.20", "255.255.255.0"), entry("169.254.3.3", "255.255.0.0")],
        "wide": [entry("10.9.8.7", "255.0.0.0")],
    }
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: fake)


def test_interface_networks_skip_loopback_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_if_addrs(monkeypatch)
    nets = [str(n) for n in sc.interface_networks(include_loopback=False)]
    assert nets == ["192.168.7.0/24", "10.9.0.0/16"]  # link-local dropped, /8 cut to its /16
    with_lo = [str(n) for n in sc.interface_networks(include_loopback=True)]
    assert with_lo == ["127.0.0.0/16", "192.168.7.0/24", "10.9.0.0/16"]
    assert sc.ScanSource().networks() == sc.interface_networks(False)


def _link(cidr: str) -> nb.Link:
    iface = ipaddress.IPv4Interface(cidr)
    return nb.Link("veth0", b"\x02\0\0\0\0\1", iface.ip, iface.network)


def test_plan_sweeps_large_on_link_parts_only() -> None:
    links = [_link("198.18.0.1/16")]
    net = ipaddress.IPv4Network
    plan = sc.plan_scan([net("198.18.0.0/16")], links, sweep_above=512)
    assert plan.swept == [net("198.18.0.0/16")] and plan.direct == []
    plan = sc.plan_scan([net("198.18.0.0/24")], links, sweep_above=512)  # small: direct
    assert plan.sweeps == [] and plan.direct == [net("198.18.0.0/24")]
    plan = sc.plan_scan([net("198.18.0.0/15")], links, sweep_above=512)  # link part swept
    assert plan.swept == [net("198.18.0.0/16")] and plan.direct == [net("198.18.0.0/15")]
    plan = sc.plan_scan([net("10.0.0.0/16")], links, sweep_above=512)  # routed: direct
    assert plan.sweeps == [] and plan.direct == [net("10.0.0.0/16")]
    plan = sc.plan_scan([net("198.18.0.0/16")], links, sweep_above=None)  # sweeps off
    assert plan.sweeps == []


def test_arp_frames_round_trip() -> None:
    link = _link("198.18.0.1/16")
    target = int(ipaddress.IPv4Address("198.18.3.4"))
    frame = nb.arp_request_frame(link.mac, link.address, target)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x08\x06"
    assert nb.parse_arp_reply(frame, link.address.packed) is None  # a request, not a reply
    # the reply host 198.18.3.4 would send back
    reply = bytearray(frame)
    reply[20:22] = b"\x00\x02"
    reply[22:28], reply[28:32] = b"\x02\0\0\0\0\2", target.to_bytes(4, "big")
    reply[32:38], reply[38:42] = link.mac, link.address.packed
    assert nb.parse_arp_reply(bytes(reply), link.address.packed) == target
    assert nb.parse_arp_reply(bytes(reply), bytes(4)) is None  # not addressed to us
    assert nb.parse_arp_reply(bytes(reply[:30]), link.address.packed) is None


def _neightbl_message(name: bytes, entries: int, fulls: int, thresh3: int) -> bytes:
    def attr(kind: int, payload: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(payload), kind) + payload
        return raw + b"\0" * (-len(raw) % 4)

    stats = struct.pack("=11Q", *([0] * 9), 7, fulls)
    config = struct.pack("=HHIIIIIII", 4, 336, entries, 0, 0, 0, 0, 0, 0)
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    body += attr(1, name + b"\0") + attr(4, struct.pack("=I", thresh3))
    body += attr(5, config) + attr(7, stats)
    return struct.pack("=IHHII", 16 + len(body), 64, 2, 1, 0) + body


def test_parse_neightbl_dump_finds_the_arp_table() -> None:
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4
    data = (
        _neightbl_message(b"ndisc_cache", 9, 9, 9)
        + _neightbl_message(b"arp_cache", 37, 2928, 2048)
        + done
    )
    stats, finished = nb.parse_neightbl_dump(data)
    assert finished and stats == nb.NeighbourStats(37, 2928, 2048, 7)
    with pytest.raises(ValueError):
        nb.parse_neightbl_dump(data[:30])


def test_parse_neigh_states_counts_entries() -> None:
    def neigh(state: int) -> bytes:
        body = struct.pack("=BBHiHBB", socket.AF_INET, 0, 0, 2, state, 0, 1)
        return struct.pack("=IHHII", 16 + len(body), 28, 2, 1, 0) + body

    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4
    states, finished = nb.parse_neigh_states(neigh(0x20) + neigh(0x02) + neigh(0x20) + done)
    assert finished and states == [0x20, 0x02, 0x20]
    assert nb.parse_neigh_states(neigh(0x01)) == ([0x01], False)
    assert nb.count_failed_neighbours() >= 0


def test_read_neighbour_stats_answers_unprivileged_and_in_any_namespace() -> None:
    stats = nb.read_neighbour_stats()  # netlink: no root needed, works in non-initial netns
    assert stats is not None and stats.gc_thresh3 > 0 and stats.entries >= 0


def test_parse_arp_stats_sums_cpus() -> None:
    text = (
        "entries  allocs forced_gc_runs table_fulls\n"
        "00000010 00000001 00000002 00000003\n"
        "00000010 00000001 00000002 00000004\n"
    )
    assert nb.parse_arp_stats(text, 512) == nb.NeighbourStats(16, 7, 512, 4)


async def test_pacer_budget_and_overflow_windows() -> None:
    readings = iter([nb.NeighbourStats(124, 100, 1024), nb.NeighbourStats(130, 105, 1024)])
    pacer = NeighbourPacer(
        fill=0.75,
        hold=3.5,
        interval=0.0,
        read_stats=lambda: next(readings, None),
        count_failed=lambda: 100,  # reclaimable: not taken
    )
    assert pacer.budget == 768 - 24
    began = await pacer.room()  # reads the table again: table_fulls rose by 5
    # measured before our connect: others hold 130 - 100 failed = 30; the overflow shrinks it
    assert pacer.overflowed_at(began) and pacer.budget == int((768 - 30) * 0.7)
    assert not pacer.overflowed_at(began + 10)


async def test_pacer_waits_when_its_budget_is_used() -> None:
    pacer = NeighbourPacer(
        fill=0.5,
        hold=0.3,
        interval=0.0,
        min_budget=1,
        read_stats=lambda: nb.NeighbourStats(0, 0, 40),
        count_failed=lambda: 0,
    )
    assert pacer.budget == 20
    starts = [await pacer.room() for _ in range(30)]
    assert starts[19] - starts[0] < 0.1  # the first 20 at once
    assert starts[20] - starts[0] >= 0.3  # the 21st only when the first has expired


def _loopback_link(monkeypatch: pytest.MonkeyPatch) -> ipaddress.IPv4Network:
    """Pretend 127.1.0.0/23 is an on-link Ethernet network: probes stay on loopback.

    The neighbour table is pinned empty: the real one is global, and another scan on this
    machine would slow these tests' pacer down.
    """
    monkeypatch.setattr(sc, "read_neighbour_stats", lambda: nb.NeighbourStats(0, 0, 1024))
    monkeypatch.setattr(sc, "count_failed_neighbours", lambda: 0)
    net = ipaddress.IPv4Network("127.1.0.0/23")
    link = nb.Link("lo", b"\x02\0\0\0\0\1", ipaddress.IPv4Address("127.1.0.1"), net)
    monkeypatch.setattr(sc, "arp_links", lambda: [link])
    return net


async def test_scan_without_raw_socket_falls_back_to_paced_tcp_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = _loopback_link(monkeypatch)

    def refuse(*args: object, **kwargs: object) -> nb.SweepResult:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(sc, "arp_sweep", refuse)
    source = sc.ScanSource(cidrs=[str(net)], ports=[1], timeout=0.5, sweep_above=256)
    report = await source.collect()
    assert report.sightings == []
    assert any("no ARP sweep of 127.1.0.0/23" in w and "root" in w for w in report.warnings)
    stats = source.last_stats
    assert (stats.addresses, stats.swept) == (510, 0) and stats.paced_rate > 0


async def test_scan_after_sweep_probes_only_hosts_that_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = _loopback_link(monkeypatch)
    asked: list[ipaddress.IPv4Network] = []

    def sweep(link: nb.Link, part: ipaddress.IPv4Network, rate: float) -> nb.SweepResult:
        asked.append(part)
        return nb.SweepResult([ipaddress.IPv4Address("127.1.1.7")], part.num_addresses - 3, 0.0)

    monkeypatch.setattr(sc, "arp_sweep", sweep)
    source = sc.ScanSource(cidrs=[str(net)], ports=[1, 2], timeout=0.5, sweep_above=256)
    report = await source.collect()
    assert asked == [net] and report.warnings == []
    stats = source.last_stats
    assert (stats.swept, stats.arp_up, stats.addresses) == (510, 1, 2)
    # A source keeps its prober, so busy memory carries from one scan to the next.
    prober = source.prober
    await source.collect()
    assert source.prober is prober


# --- the isolated LAN: real namespaces, real processes (root) --------------------------------

NET24 = "198.18.0.0/24"
READY = ("198.18.0.10", "198.18.0.11")
BUSY = "198.18.0.12"
REFUSING = "198.18.0.13"
NOT_RPC = "198.18.0.14"
EXPECTED = {READY[0]: "ready", READY[1]: "ready", BUSY: "busy", NOT_RPC: "not-rpc"}


@dataclass
class SmallLan:
    lan: Lan
    tmp: Path
    busy_server: Child
    holder: Child

    async def in_a(self, argv: list[str], seconds: float = 30.0) -> str:
        return await run_in(self.lan, self.lan.ns_a, argv, self.tmp / "run-a.log", seconds)


def _seen(scan: dict[str, Any]) -> dict[str, str]:
    return {b["host"]: b["status"] for b in scan["found"]}


@pytest.fixture
async def small_lan(llama_bins: LlamaBinaries, tmp_path: Path) -> AsyncIterator[SmallLan]:
    if CANNOT_BUILD_LAN:
        pytest.skip(CANNOT_BUILD_LAN)
    with isolated_lan() as lan:
        children: list[Child] = []
        try:
            for host in (*READY, BUSY, REFUSING, NOT_RPC):
                lan.add_address(lan.ns_b, f"{host}/16")
            servers = {}
            for host in (*READY, BUSY):
                argv = rpc_server_argv(llama_bins.rpc_server, host, PORT, threads=1)
                servers[host] = await start_in(lan, lan.ns_b, argv, tmp_path / f"rpc-{host}.log")
                children.append(servers[host])
            for host, child in servers.items():
                await wait_listening(child, host, PORT)
            banner = await start_in(
                lan, lan.ns_b, helper_argv("banner", NOT_RPC, str(PORT)), tmp_path / "banner.log"
            )
            children.append(banner)
            holder = await start_in(
                lan, lan.ns_b, helper_argv("hold", BUSY, str(PORT)), tmp_path / "hold.log"
            )
            children.append(holder)
            await wait_for_line(banner, "listening")
            await wait_for_line(holder, "held")
            yield SmallLan(lan, tmp_path, servers[BUSY], holder)
        finally:
            for child in reversed(children):
                await child.stop(grace=3)


@pytest.mark.root
@needs_lan
async def test_lan_is_isolated(small_lan: SmallLan) -> None:
    lan = small_lan.lan
    for ns in (lan.ns_a, lan.ns_b):
        assert not any(r.startswith("default") for r in lan.routes(ns))
        veth = lan.veth_a if ns == lan.ns_a else lan.veth_b
        assert sorted(name.split("@")[0] for name in lan.links(ns)) == sorted(["lo", veth])
        for addr in lan.addresses[ns]:
            assert ipaddress.IPv4Address(addr) in BENCH_NET


@pytest.mark.root
@needs_lan
async def test_scan_classifies_the_lan_and_busy_stays_busy(small_lan: SmallLan) -> None:
    out = await small_lan.in_a(helper_argv("scan", "--cidr", NET24, "--repeat", "5"))
    scans = scan_lines(out)
    assert len(scans) == 5
    for scan in scans:
        assert _seen(scan) == EXPECTED, f"scan {scan['scan']}: {scan['found']}"
        assert scan["stats"]["addresses"] == 254 and scan["stats"]["swept"] == 0
    busy = [b for s in scans for b in s["found"] if b["host"] == BUSY]
    assert all(b["error"] for b in busy)  # says why it is busy
    # The probes never harmed the busy backend: alive, and ready once its client leaves.
    assert small_lan.busy_server.returncode is None
    await small_lan.holder.stop()
    out = await small_lan.in_a(
        [sys.executable, "-m", "corral", "probe", f"{BUSY}:{PORT}", "--timeout", "3", "--json"]
    )
    assert '"status": "ready"' in out, out
    assert small_lan.busy_server.returncode is None


@pytest.mark.root
@needs_lan
async def test_arp_sweep_path_finds_the_same(small_lan: SmallLan) -> None:
    out = await small_lan.in_a(helper_argv("scan", "--cidr", NET24, "--sweep-above", "0"))
    (scan,) = scan_lines(out)
    assert _seen(scan) == EXPECTED
    stats = scan["stats"]
    # ARP answered by the five addresses ns B holds; TCP only to them and to our own address.
    assert (stats["swept"], stats["arp_up"], stats["addresses"]) == (254, 5, 6)


@pytest.mark.root
@needs_lan
async def test_discover_json_contract_inside_the_namespace(small_lan: SmallLan) -> None:
    import json

    out = await small_lan.in_a(
        [sys.executable, "-m", "corral", "discover", "--cidr", NET24, "--json"]
    )
    backends = json.loads(out[out.index("[") :])
    keys = {
        "host",
        "port",
        "status",
        "version",
        "devices",
        "latency_ms",
        "sources",
        "error",
        "names",
    }
    assert all(set(b) == keys for b in backends)
    assert {b["host"]: b["status"] for b in backends} == EXPECTED
    for b in backends:
        assert b["port"] == PORT and b["sources"] == ["scan"]
        if b["status"] == "ready":
            assert b["version"] == "7.0.0" and b["devices"] and b["latency_ms"] > 0
            assert b["error"] is None


@pytest.mark.root
@needs_lan
async def test_paced_tcp_scan_of_a_22_finds_the_last_address_without_overflow(
    llama_bins: LlamaBinaries, tmp_path: Path
) -> None:
    """No ARP sweep: 1022 on-link connects, more than the pacer lets in at once."""
    with isolated_lan() as lan:
        far = lan.add_address(lan.ns_b, "198.18.3.254/16")
        argv = rpc_server_argv(llama_bins.rpc_server, far, PORT, threads=1)
        server = await start_in(lan, lan.ns_b, argv, tmp_path / "rpc.log")
        try:
            await wait_listening(server, far, PORT)
            out = await run_in(
                lan,
                lan.ns_a,
                helper_argv("scan", "--cidr", "198.18.0.0/22", "--no-sweep"),
                tmp_path / "scan.log",
                60,
            )
        finally:
            await server.stop(grace=3)
    (scan,) = scan_lines(out)
    assert _seen(scan) == {far: "ready"}
    stats = scan["stats"]
    assert stats["addresses"] - stats["retried"] == 1022 and stats["paced_rate"] > 0
    # The table is global: another job on this kernel may overflow it during our scan. Then the
    # probes that may have lost their SYN must have been sent again.
    assert stats["neighbour_overflows"] == 0 or stats["retried"] > 0, scan


async def test_a_scan_says_when_an_up_host_accepts_no_connection() -> None:
    """A backend held by a client, its accept queue full, drops new SYNs: a scan cannot list
    it, but must not stay silent either (it used to list nothing and say nothing)."""
    host = next_loopback()
    full = socket.socket()
    full.bind((host, 0))
    full.listen(0)  # never accepted: the queue fills like a held rpc-server's
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((host, port))
            fillers.append(s)
        source = sc.ScanSource(cidrs=[f"{host}/32"], ports=[port], timeout=0.3)
        report = await source.collect()
    finally:
        for s in fillers:
            s.close()
        full.close()
    assert report.sightings == []
    [warning] = [w for w in report.warnings if "accepted no connection" in w]
    assert f"{host}:{port}" in warning and "accept queue full" in warning
