"""The one state interface; the embedded (SQLite) and Redis stores implement it.

Everything that shows or acts reads from the store, never from a fresh scan. Values crossing
this boundary are the typed records below; implementations validate what they read back
(through the endpoint gate) and drop bad entries with a warning saying what and where.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from corral.endpoint import Endpoint
from corral.types import CoordinatorState, Device, DeviceMemory, SourceName, Status

DEFAULT_HEARTBEAT_S = 2.0
MISSED_BEATS = 3  # a node is gone after three missed heartbeats
MAX_EVENTS = 1000  # bounded history


class EventKind(StrEnum):
    BACKEND_APPEARED = "backend_appeared"
    BACKEND_STATUS = "backend_status_changed"
    BACKEND_GONE = "backend_disappeared"
    NODE_REGISTERED = "node_registered"
    NODE_GONE = "node_gone"
    COORDINATOR_STARTED = "coordinator_started"
    COORDINATOR_RESTARTED = "coordinator_restarted"
    COORDINATOR_STOPPED = "coordinator_stopped"
    COORDINATOR_FAILED = "coordinator_failed"
    WARNING = "warning"
    STORE_CAUGHT_UP = "store_caught_up"  # shared store reachable again, local view pushed


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    message: str
    endpoint: Endpoint | None = None
    ts: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeRegistration:
    """What a node agent knows locally about the backend beside it."""

    node_id: str
    endpoint: Endpoint
    hostname: str
    status: Status
    version: str | None = None
    devices: tuple[Device, ...] = ()
    client: str | None = None  # address of the client holding the backend (the coordinator)
    uptime_s: float = 0.0
    restarts: int = 0
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    last_heartbeat: float = field(default_factory=time.time)
    # rpc-server's tensor cache (-c): its directory (None: off or unknown) and the bytes it held
    # at the last measure (None: not measured yet); `cache_capped`: the bounded walk stopped
    # early, so it holds at least that much.
    cache_dir: str | None = None
    cache_bytes: int | None = None
    cache_capped: bool = False

    @property
    def ttl_s(self) -> float:
        return self.heartbeat_s * MISSED_BEATS


@dataclass(frozen=True, slots=True)
class BackendRecord:
    """The last known view of one backend."""

    endpoint: Endpoint
    status: Status
    version: str | None = None
    devices: tuple[Device, ...] = ()
    sources: tuple[SourceName, ...] = ()
    latency_ms: float | None = None
    error: str | None = None
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    in_use: bool = False
    client: str | None = None
    names: tuple[Endpoint, ...] = ()  # other names of this backend (same address and port)
    # Not re-verified since this store was opened (loaded from disk or another machine's Redis
    # write before we started); a fresh put clears it.
    stale: bool = False


@dataclass(frozen=True, slots=True)
class CoordinatorRecord:
    """What the coordinator publishes: its state and the backend set in use."""

    state: CoordinatorState
    backends: tuple[Endpoint, ...] = ()
    pid: int | None = None
    port: int | None = None
    model: str | None = None
    started_at: float | None = None
    restarts: int = 0
    last_reason: str | None = None
    updated_at: float = field(default_factory=time.time)
    # Per device: bytes planned for, and used (from llama-server's log) once it serves.
    memory: tuple[DeviceMemory, ...] = ()


TOPICS = frozenset({"backends", "nodes", "coordinator", "events"})


@dataclass(frozen=True, slots=True)
class Change:
    """A notification to subscribers: what kind of thing changed (and the event, if any)."""

    topic: str  # "backends", "nodes", "coordinator", "events"
    event: Event | None = None


class Subscription(Protocol):
    """Live from the moment `Store.subscribe` returns; ends when closed or the store closes."""

    def __aiter__(self) -> Subscription: ...
    async def __anext__(self) -> Change: ...
    async def aclose(self) -> None: ...


class Store(Protocol):
    def take_warnings(self) -> list[str]:
        """Warnings about dropped or unreadable entries, Redis gone or back (what and where),
        not yet taken: each is delivered once, to the caller that takes it, to show."""
        ...

    def shared_reachable(self) -> bool | None:
        """Is the shared store (Redis) reachable now? None when there is none."""
        ...

    async def legacy_backends(self) -> list[Endpoint]:
        """The older design's `rpc_backends` list (Redis key sollol:router:metadata), if any."""
        ...

    async def register_node(self, reg: NodeRegistration) -> None: ...
    async def unregister_node(self, node_id: str) -> None: ...
    async def live_nodes(self) -> list[NodeRegistration]:
        """Registrations whose last heartbeat is within their TTL; expired ones are gone."""
        ...

    async def put_backends(self, records: list[BackendRecord]) -> None:
        """Upsert; keeps first_seen of known endpoints."""
        ...

    async def remove_backend(self, endpoint: Endpoint) -> None: ...
    async def backends(self) -> list[BackendRecord]: ...

    async def set_coordinator(self, record: CoordinatorRecord) -> None: ...
    async def coordinator(self) -> CoordinatorRecord | None: ...

    async def add_event(self, event: Event) -> None: ...
    async def events(self, limit: int = 100) -> list[Event]:
        """Most recent last."""
        ...

    async def subscribe(self) -> Subscription:
        """Async so that no change made after it returns is missed."""
        ...

    async def close(self) -> None: ...
