"""Memory per backend and device, planned and used, from the coordinator to the API and /metrics.

- the store codec carries it and refuses bad entries, saying where;
- the publisher keeps it only while the llama-server it was read from runs;
- a real Runner on two real ggml-rpc-servers publishes what its llama-server's log says;
- a real `corral up` shows it in `/api/coordinator` and `/metrics`, matching its log.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from corral.coordinator.publish import Publisher
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.buffers import HOST, LOG_HEAD_BYTES, device_memory, parse_buffers
from corral.store import codec
from corral.store.base import CoordinatorRecord
from corral.store.sqlite import EmbeddedStore
from corral.types import BufferBytes, CoordinatorState, DeviceMemory, DeviceRef
from corral.web.schemas import CoordinatorOut
from tests.support.coordinator import running
from tests.support.corral_up import corral_up
from tests.support.dashboard import TOKEN
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

A, B = Endpoint("127.0.0.91", 50091), Endpoint("gpu-box.lan", 50052)
MEMORY = (
    DeviceMemory(DeviceRef(A, "0"), 6_000_000, BufferBytes(325_059, 262_144, 4_907_336)),
    DeviceMemory(DeviceRef(B, "1"), None, BufferBytes()),
    DeviceMemory(DeviceRef(None, HOST), 4_000_000, None),
)


def test_the_record_carries_memory_and_reads_it_back() -> None:
    rec = CoordinatorRecord(CoordinatorState.SERVING, (A, B), pid=7, port=18080, memory=MEMORY)
    data = codec.coordinator_to_json(rec)
    assert data["memory"][0] == {
        "backend": str(A),
        "device": "0",
        "planned_bytes": 6_000_000,
        "used": {"model": 325_059, "kv": 262_144, "compute": 4_907_336},
    }
    assert codec.coordinator_from_json(data, "coordinator") == rec
    # A record written before memory was published reads as having none.
    del data["memory"]
    assert codec.coordinator_from_json(data, "coordinator").memory == ()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"backend": "x:0", "device": "0"}, "'memory'[0]: field 'backend'"),
        ({"backend": None, "device": "a b"}, "'memory'[0]: field 'device': not a device name"),
        ({"backend": None, "device": "\x1b[2J"}, "'memory'[0]: field 'device': control"),
        ({"backend": None, "device": "0", "planned_bytes": -1}, "field 'planned_bytes'"),
        ({"backend": None, "device": "0", "used": {"model": 1, "kv": 0}}, "field 'compute'"),
        ({"backend": None, "device": "0", "used": {"model": True, "kv": 0, "compute": 0}}, "model"),
        (
            {"backend": None, "device": "0", "used": {"model": 2**64, "kv": 0, "compute": 0}},
            "model",
        ),
    ],
)
def test_bad_memory_entries_are_refused_saying_where(entry: dict[str, Any], why: str) -> None:
    data = codec.coordinator_to_json(CoordinatorRecord(CoordinatorState.SERVING, (A,)))
    data["memory"] = [entry]
    with pytest.raises(codec.CodecError, match=re.escape(why)):
        codec.coordinator_from_json(data, "coordinator")


def test_too_many_entries_are_refused() -> None:
    data = codec.coordinator_to_json(CoordinatorRecord(CoordinatorState.SERVING, (A,)))
    data["memory"] = [{"backend": None, "device": str(i)} for i in range(codec.MAX_MEMORY + 1)]
    with pytest.raises(codec.CodecError, match="more than"):
        codec.coordinator_from_json(data, "coordinator")


async def test_the_publisher_keeps_memory_only_while_its_llama_server_runs(
    tmp_path: Path,
) -> None:
    store = await EmbeddedStore.open(tmp_path / "state.db")
    said: list[str] = []
    pub = Publisher(store, 18080, said.append, said.append)

    async def stored() -> tuple[DeviceMemory, ...]:
        rec = await store.coordinator()
        assert rec is not None
        return rec.memory

    try:
        await pub.state(CoordinatorState.SERVING, backends=(A, B), pid=7, memory=MEMORY)
        assert await stored() == MEMORY
        # Draining the same llama-server: kept.
        await pub.state(CoordinatorState.RESTARTING, pid=7, reason="asked")
        assert await stored() == MEMORY
        # A new one starting: the last one's is gone (unless its plan is given).
        await pub.state(CoordinatorState.STARTING, backends=(A,))
        assert await stored() == ()
        await pub.state(CoordinatorState.STARTING, backends=(A,), memory=MEMORY[:1])
        assert await stored() == MEMORY[:1]
        await pub.state(CoordinatorState.SERVING, backends=(A,), pid=8, memory=MEMORY)
        # It died (no pid any more), or nothing runs: gone.
        await pub.state(CoordinatorState.RESTARTING, reason="llama-server died")
        assert await stored() == ()
        await pub.state(CoordinatorState.SERVING, backends=(A,), pid=9, memory=MEMORY)
        await pub.state(CoordinatorState.STOPPED, backends=())
        assert await stored() == ()
        # More devices than a record holds: the first MAX_MEMORY, and the record is stored.
        many = tuple(
            DeviceMemory(DeviceRef(Endpoint("127.0.0.1", p), "0"), 1, BufferBytes(1, 0, 0))
            for p in range(1, codec.MAX_MEMORY + 20)
        )
        await pub.state(CoordinatorState.SERVING, backends=(A,), pid=10, memory=many)
        assert await stored() == many[: codec.MAX_MEMORY]
    finally:
        await store.close()


async def test_a_real_runner_publishes_what_its_llama_server_used(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with running(tmp_path, llama_bins, tiny_model, [a, b]) as c:
        rec = await c.wait_serving([a, b])
        log = c.runner.log_path.read_bytes()[:LOG_HEAD_BYTES].decode(errors="replace")
        used = parse_buffers(log)
        assert rec.memory == device_memory(used, c.runner.planned)
        got = {m.ref: m for m in rec.memory}
        for ep in (a, b):  # --tensor-split 1,1: weights on both
            mem = got[DeviceRef(ep, "0")]
            assert mem.used is not None and mem.used.model > 0 and mem.used_bytes, mem
            want = None if c.runner.planned is None else c.runner.planned.get(mem.ref)
            assert mem.planned_bytes == want


def _samples(exposition: str, name: str) -> dict[tuple[str, ...], float]:
    out = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1 :].rpartition("} ")
            out[tuple(re.findall(r'="([^"]*)"', labels))] = float(value)
    return out


async def test_corral_up_shows_memory_in_the_api_and_metrics(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with corral_up(tmp_path, [a, b], tiny_model, "--tensor-split", "1,1", token=TOKEN) as up:
        await up.wait_serving({a, b}, seconds=30)
        shown: dict[str, Any] = {}

        async def memory_shown() -> bool:
            shown.update(await up.coordinator())
            return bool(shown["memory"])

        await until(memory_shown, 10, "memory in /api/coordinator")
        CoordinatorOut.model_validate(shown)  # the schema the OpenAPI document states
        async with up.client() as client:
            exposition = (await client.get("/metrics")).text

    # What the API says is what the llama-server's own log says, device by device.
    logs = list((tmp_path / "state").rglob(f"llama-server-{up.coordinator_port}.log"))
    assert len(logs) == 1, logs
    used = parse_buffers(await asyncio.to_thread(logs[0].read_text, errors="replace"))
    by_device = {(m["backend"], m["device"]): m for m in shown["memory"]}
    assert set(by_device) == {(r.backend_name, r.device) for r in used}
    for ref, u in used.items():
        m = by_device[(ref.backend_name, ref.device)]
        assert (m["model_bytes"], m["kv_bytes"], m["compute_bytes"]) == (u.model, u.kv, u.compute)
        assert m["used_bytes"] == u.total
    for ep in (a, b):
        assert by_device[(str(ep), "0")]["used_bytes"] > 0

    # /metrics: one gauge per kind, and a planned gauge exactly where a plan was given.
    gauges = _samples(exposition, "corral_device_used_bytes")
    assert gauges == {
        (m["backend"], m["device"], kind): float(m[f"{kind}_bytes"])
        for m in shown["memory"]
        for kind in ("model", "kv", "compute")
    }
    assert _samples(exposition, "corral_device_planned_bytes") == {
        (m["backend"], m["device"]): float(m["planned_bytes"])
        for m in shown["memory"]
        if m["planned_bytes"] is not None
    }
