"""Tell the world what the coordinator does: events and the CoordinatorRecord in the store, and a
line for the person watching. A store that fails to write must not stop the coordinator."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from corral.endpoint import Endpoint
from corral.store.base import CoordinatorRecord, Event, EventKind, Store
from corral.store.codec import MAX_MEMORY
from corral.types import CoordinatorState, DeviceMemory

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class Publisher:
    store: Store
    port: int
    say: Say
    warn: Say
    record: CoordinatorRecord = field(init=False)

    def __post_init__(self) -> None:
        self.record = CoordinatorRecord(state=CoordinatorState.STARTING, port=self.port)

    async def event(
        self, kind: EventKind, message: str, endpoint: Endpoint | None = None, **data: Any
    ) -> None:
        try:
            await self.store.add_event(Event(kind, message, endpoint, data=data))
        except Exception as exc:  # the store is a witness, not a dependency
            log.warning("could not record event %s: %s", kind, exc)

    async def state(
        self,
        state: CoordinatorState,
        *,
        backends: tuple[Endpoint, ...] | None = None,
        pid: int | None = None,
        model: str | None = None,
        started_at: float | None = None,
        reason: str | None = None,
        restarted: bool = False,
        memory: tuple[DeviceMemory, ...] | None = None,
    ) -> None:
        """`memory`: each device's planned and used bytes; None keeps the last while the same
        llama-server runs (a pid given), and drops it when a new one starts or none runs."""
        r = self.record
        self.record = replace(
            r,
            state=state,
            backends=r.backends if backends is None else backends,
            pid=pid,
            model=model or r.model,
            started_at=started_at if started_at is not None else r.started_at,
            restarts=r.restarts + 1 if restarted else r.restarts,
            last_reason=reason or r.last_reason,
            updated_at=time.time(),
            memory=self._memory(state, pid, r.memory, memory),
        )
        try:
            await self.store.set_coordinator(self.record)
        except Exception as exc:
            log.warning("could not publish coordinator state %s: %s", state, exc)

    def _memory(
        self,
        state: CoordinatorState,
        pid: int | None,
        last: tuple[DeviceMemory, ...],
        given: tuple[DeviceMemory, ...] | None,
    ) -> tuple[DeviceMemory, ...]:
        if not state.holds_backends:
            return ()
        if given is not None:
            memory = given
        elif pid is None or state is CoordinatorState.STARTING:  # not the same llama-server
            return ()
        else:
            memory = last
        if len(memory) > MAX_MEMORY:  # the record must stay storable: the rest goes unshown
            log.warning("memory of %d devices; publishing the first %d", len(memory), MAX_MEMORY)
            return memory[:MAX_MEMORY]
        return memory
