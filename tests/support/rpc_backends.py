"""Real ggml-rpc-servers in tests: the `rpc_server` fixture's type, and waiting for a status.

The fixture itself lives in tests/conftest.py; `StartRpc` is what a test receives from it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from corral.endpoint import Endpoint
from corral.llama.supervisor import Child
from corral.rpc.probe import Prober
from corral.types import ProbeResult, Status
from tests.support.waiting import until

# `ep, child = await rpc_server(host=None, port=None)`: started, and probed ready.
StartRpc = Callable[..., Awaitable[tuple[Endpoint, Child]]]


async def wait_status(ep: Endpoint, want: Status, seconds: float = 10.0) -> ProbeResult:
    """Probe `ep` until it shows `want`; return that probe's result."""
    prober = Prober(timeout=1.0)
    last: list[ProbeResult] = []

    async def shows() -> bool:
        last[:] = [await prober.probe(ep)]
        return last[0].status is want

    try:
        await until(shows, seconds, f"{ep} to be {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last probe: {last}") from None
    return last[0]
