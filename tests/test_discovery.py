"""The discovery chain: merge sightings by endpoint, probe each once, first live source decides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.discovery import Discovery, choose, merge
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.rpc.probe import Prober
from corral.sources.base import Source, SourceReport
from corral.sources.chain import ChainOptions, build_chain
from corral.types import Backend, ProbeResult, Sighting, SourceName, Status
from tests.support.llama_server import running_llama_server
from tests.support.loopback import free_port
from tests.support.rpc_backends import StartRpc

E1, E2, E3 = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 2), Endpoint("10.0.0.3", 3)


def report(
    source: SourceName, *eps: Endpoint, probes: dict[Endpoint, Status] | None = None
) -> SourceReport:
    r = SourceReport(source, [Sighting(ep, source, "test") for ep in eps])
    for ep, status in (probes or {}).items():
        r.probes[str(ep)] = ProbeResult(ep, status)
    return r


def with_status(backends: list[Backend], status: dict[Endpoint, Status]) -> list[Backend]:
    for b in backends:
        b.probe = ProbeResult(b.endpoint, status[b.endpoint])
    return backends


def test_merge_one_backend_per_endpoint_with_all_sources_in_priority_order() -> None:
    reports = [
        report(SourceName.PROCESS, E2),
        report(SourceName.FILE, E1, E2, E1),
        report(SourceName.SCAN, E3, E2, probes={E3: Status.READY, E2: Status.BUSY}),
    ]
    backends = merge(reports)
    assert [b.endpoint for b in backends] == [E2, E1, E3]
    assert backends[0].sources == [SourceName.PROCESS, SourceName.FILE, SourceName.SCAN]
    assert backends[1].sources == [SourceName.FILE]
    assert backends[2].sources == [SourceName.SCAN]
    # The scan already spoke to E2 and E3: their results are kept, so nobody probes them again.
    assert backends[0].probe is not None and backends[0].probe.status is Status.BUSY
    assert backends[2].probe is not None and backends[2].probe.status is Status.READY
    assert backends[1].probe is None


def test_merge_of_nothing() -> None:
    assert merge([]) == []
    assert merge([report(SourceName.FILE)]) == []


def test_first_source_with_a_live_backend_decides() -> None:
    reports = [report(SourceName.PROCESS, E1), report(SourceName.FILE, E2, E3)]
    backends = with_status(merge(reports), {E1: Status.OFFLINE, E2: Status.BUSY, E3: Status.READY})
    assert choose(reports, backends) == (SourceName.FILE, [E2, E3])


def test_an_all_dead_source_does_not_hide_the_next() -> None:
    reports = [
        report(SourceName.PROCESS, E1, E2),
        report(SourceName.FILE, E3),
    ]
    status = {E1: Status.NOT_RPC, E2: Status.INCOMPATIBLE, E3: Status.READY}
    assert choose(reports, with_status(merge(reports), status)) == (SourceName.FILE, [E3])


def test_only_the_deciding_sources_live_backends_are_chosen() -> None:
    reports = [report(SourceName.FILE, E1, E2), report(SourceName.SCAN, E3)]
    status = {E1: Status.READY, E2: Status.OFFLINE, E3: Status.READY}
    assert choose(reports, with_status(merge(reports), status)) == (SourceName.FILE, [E1])


def test_busy_counts_as_live_and_duplicates_are_chosen_once() -> None:
    reports = [report(SourceName.PROCESS, E1, E1)]
    assert choose(reports, with_status(merge(reports), {E1: Status.BUSY})) == (
        SourceName.PROCESS,
        [E1],
    )


def test_nothing_live_means_no_set() -> None:
    reports = [report(SourceName.FILE, E1)]
    assert choose(reports, with_status(merge(reports), {E1: Status.OFFLINE})) == (None, [])
    # Unprobed backends are not live either.
    assert choose(reports, merge(reports)) == (None, [])


@dataclass
class ListSource:
    """A source whose sightings are given: to drive Discovery.run without touching the system."""

    name: SourceName
    endpoints: list[Endpoint]

    async def collect(self) -> SourceReport:
        return report(self.name, *self.endpoints)


@dataclass
class BrokenSource:
    """A source that crashes — a bug we cannot cause in a real source on demand."""

    name: SourceName = SourceName.FILE
    calls: list[int] = field(default_factory=list)

    async def collect(self) -> SourceReport:
        self.calls.append(1)
        raise RuntimeError("disk on fire")


async def test_run_probes_every_backend_once_and_survives_a_broken_source(
    rpc_server: StartRpc, loopback_host: str
) -> None:
    ready, _ = await rpc_server()
    dead = Endpoint(loopback_host, free_port(loopback_host))
    broken = BrokenSource()
    sources: list[Source] = [
        ListSource(SourceName.PROCESS, [dead]),
        broken,
        ListSource(SourceName.SCAN, [ready, dead]),
    ]
    result = await Discovery(sources, Prober(timeout=1.0)).run()
    assert broken.calls == [1]
    assert result.warnings == ["source file: failed: disk on fire"]
    by_ep = {b.endpoint: b for b in result.backends}
    assert set(by_ep) == {ready, dead}
    assert by_ep[dead].sources == [SourceName.PROCESS, SourceName.SCAN]
    dead_probe, ready_probe = by_ep[dead].probe, by_ep[ready].probe
    assert dead_probe is not None and dead_probe.status is Status.OFFLINE
    assert ready_probe is not None and ready_probe.status is Status.READY
    assert (result.deciding_source, result.chosen) == (SourceName.SCAN, [ready])


async def test_real_chain_file_and_scan(
    rpc_server: StartRpc, tmp_path: Path, loopback_host: str
) -> None:
    (listed, _), (unlisted, _) = await rpc_server(), await rpc_server()
    dead = Endpoint(loopback_host, free_port(loopback_host))
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text(f"# test\n{listed}\n{dead}   # nothing runs here\ncoordinator:0\n")
    options = ChainOptions(
        backends_file=str(conf),
        cidrs=[f"{listed.host}/32", f"{unlisted.host}/32"],
        ports=sorted({listed.port, unlisted.port}),
        scan_timeout=0.5,
    )
    prober = Prober(timeout=1.0)
    chain = build_chain([SourceName.FILE, SourceName.SCAN], options, prober)
    result = await Discovery(chain, prober).run()
    by_ep = {b.endpoint: b for b in result.backends}
    assert set(by_ep) == {listed, dead, unlisted}
    assert by_ep[listed].sources == [SourceName.FILE, SourceName.SCAN]
    assert by_ep[dead].sources == [SourceName.FILE]
    assert by_ep[unlisted].sources == [SourceName.SCAN]
    status = {ep: b.probe.status for ep, b in by_ep.items() if b.probe}
    assert status == {listed: Status.READY, dead: Status.OFFLINE, unlisted: Status.READY}
    # The file has a live backend: it decides, and only its live backend is in the set.
    assert (result.deciding_source, result.chosen) == (SourceName.FILE, [listed])
    assert result.warnings == [f"{conf}:4: placeholder host, not a backend: 'coordinator:0'"]


async def test_real_chain_dead_file_lets_the_scan_decide(
    rpc_server: StartRpc, tmp_path: Path, loopback_host: str
) -> None:
    found, _ = await rpc_server()
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text(f"{loopback_host}:{free_port(loopback_host)}\n")
    options = ChainOptions(backends_file=str(conf), cidrs=[f"{found.host}/32"], ports=[found.port])
    prober = Prober(timeout=1.0)
    chain = build_chain([SourceName.FILE, SourceName.SCAN], options, prober)
    result = await Discovery(chain, prober).run()
    assert (result.deciding_source, result.chosen) == (SourceName.SCAN, [found])
    assert len(result.backends) == 2


@dataclass
class OnlyPids:
    """The real process source, narrowed to llama-servers this test started.

    Other llama-servers may run on this machine (other test sessions); probing their backends
    could send traffic off loopback, so their sightings are dropped before anything is probed.
    """

    inner: Source
    pids: set[int]
    name: SourceName = SourceName.PROCESS

    async def collect(self) -> SourceReport:
        full = await self.inner.collect()
        keep = [s for s in full.sightings if any(f"pid {p} " in s.detail for p in self.pids)]
        return SourceReport(full.source, keep)


@pytest.mark.llama
async def test_real_chain_running_coordinator_decides(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    (held1, _), (held2, _), (spare, _) = [await rpc_server() for _ in range(3)]
    conf = tmp_path / "rpc_backends.conf"
    conf.write_text(f"{spare}\n{held1}\n")
    options = ChainOptions(backends_file=str(conf))
    async with running_llama_server(llama_bins, tiny_model, tmp_path, rpc_flag=[held1, held2]) as (
        child,
        _,
    ):
        assert child.pid is not None
        prober = Prober(timeout=0.5)
        process, file = build_chain([SourceName.PROCESS, SourceName.FILE], options, prober)
        result = await Discovery([OnlyPids(process, {child.pid}), file], prober).run()
    by_ep = {b.endpoint: b for b in result.backends}
    # The running coordinator's backends are busy — live — so the process source decides.
    assert result.deciding_source is SourceName.PROCESS
    assert result.chosen == [held1, held2]
    assert by_ep[held1].sources == [SourceName.PROCESS, SourceName.FILE]
    assert by_ep[held2].sources == [SourceName.PROCESS]
    assert by_ep[spare].sources == [SourceName.FILE]
    for ep, want in ((held1, Status.BUSY), (held2, Status.BUSY), (spare, Status.READY)):
        probe = by_ep[ep].probe
        assert probe is not None and probe.status is want, (ep, probe)


def test_empty_sources_option_is_refused_not_the_default_chain() -> None:
    # An empty --sources must not silently run mdns and a scan of the real networks.
    import pytest

    from corral.sources.chain import ChainError, parse_source_names

    with pytest.raises(ChainError, match="empty"):
        parse_source_names("  ")
    assert parse_source_names(None)[0].value == "process"
