"""The backends the coordinator could use, and a fresh probe of each one it does not hold.

Candidates: the endpoints named on the command line, the store's view of backends (kept by the
monitor) and live node registrations. A held backend is never probed (see links.py for how it
is watched). A backend busy with another client is probed again only after a while: each probe
of a busy backend leaves a connection in its accept queue, which delays its own client's next
reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from corral.endpoint import Endpoint
from corral.llama.server import rpc_unusable
from corral.net.identity import identities, one_per_backend
from corral.rpc.probe import Prober
from corral.store.base import NodeRegistration, Store
from corral.types import ProbeResult, Status

BUSY_REPROBE_S = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Round:
    """One look at the candidates."""

    results: dict[Endpoint, ProbeResult]
    nodes: dict[Endpoint, NodeRegistration] | None  # None: the store could not be read

    @property
    def ready(self) -> frozenset[Endpoint]:
        return frozenset(e for e, r in self.results.items() if r.status is Status.READY)


@dataclass
class Candidates:
    explicit: tuple[Endpoint, ...]
    store: Store
    prober: Prober
    busy_reprobe_s: float = BUSY_REPROBE_S
    _busy_at: dict[Endpoint, float] = field(default_factory=dict)

    async def look(self, held: Iterable[Endpoint], also: Iterable[Endpoint] = ()) -> Round:
        """Probe every candidate not held; `also`: endpoints to consider besides (the set
        llama-server ran with, which may have come from an adopted command line)."""
        held = frozenset(held)
        nodes: dict[Endpoint, NodeRegistration] | None
        try:
            nodes = {n.endpoint: n for n in await self.store.live_nodes()}
            records = await self.store.backends()
        except Exception as exc:  # keep serving on what we know; the store may come back
            log.warning("store unreadable, using known backends only: %s", exc)
            nodes, records = None, []
        named = [*held, *self.explicit, *also, *(r.endpoint for r in records), *(nodes or {})]
        # Two names of one backend are one candidate (the held name, else the first, wins):
        # llama-server given both would open two connections to a one-client server.
        every = one_per_backend(named, await identities(named))
        now = time.monotonic()
        todo = [e for e in every if e not in held and not self._resting(e, now)]
        results = [_usable(r) for r in await asyncio.gather(*(self.prober.probe(e) for e in todo))]
        for r in results:
            if r.status is Status.BUSY:
                self._busy_at[r.endpoint] = now
            else:
                self._busy_at.pop(r.endpoint, None)
        return Round({r.endpoint: r for r in results}, nodes)

    def release(self, endpoints: Iterable[Endpoint]) -> None:
        """These were busy because we held them: probe them at once from now on."""
        for e in endpoints:
            self._busy_at.pop(e, None)

    def _resting(self, endpoint: Endpoint, now: float) -> bool:
        seen = self._busy_at.get(endpoint)
        return seen is not None and now - seen < self.busy_reprobe_s


def _usable(result: ProbeResult) -> ProbeResult:
    """A ready backend llama-server cannot name in --rpc is incompatible with it, said why."""
    why = rpc_unusable(result.endpoint)
    if why is None or result.status is not Status.READY:
        return result
    return replace(result, status=Status.INCOMPATIBLE, error=why)
