"""A real ggml-rpc-server answers the probe as `ready` with version and devices."""

from __future__ import annotations

from corral.rpc.probe import Prober
from corral.types import Status
from tests.support.rpc_backends import StartRpc


async def test_real_backend_is_ready(rpc_server: StartRpc) -> None:
    ep, _ = await rpc_server()
    result = await Prober(timeout=2).probe(ep)
    assert result.status is Status.READY
    assert result.version == "7.0.0"
    assert result.devices and result.devices[0].total_bytes > 0
    assert result.latency_ms is not None and result.latency_ms > 0
