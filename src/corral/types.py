"""The typed values that flow between rooms: statuses, probe results, sightings, backends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from corral.endpoint import Endpoint


class Status(StrEnum):
    READY = "ready"
    BUSY = "busy"
    OFFLINE = "offline"
    INCOMPATIBLE = "incompatible"
    NOT_RPC = "not-rpc"


class CoordinatorState(StrEnum):
    """What the coordinator is doing; written by its runner, read by every process that shows it.

    One list, from the runner's own words to the page's: nothing is ever mapped to another state.
    """

    WAITING = "waiting"  # too few ready backends; no llama-server runs
    STARTING = "starting"  # llama-server launched, loading the model
    SERVING = "serving"
    RESTARTING = "restarting"  # stopping one llama-server to start another
    STOPPING = "stopping"  # the coordinator is shutting down
    STOPPED = "stopped"
    FAILED = "failed"  # llama-server would not start or keep running

    @property
    def holds_backends(self) -> bool:
        """Does a llama-server of ours (alive, or being stopped) hold the record's backends?"""
        return self in _HOLDING

    @property
    def tone(self) -> str:
        """The one display mapping: ok, working, idle or down (the page's colour for it)."""
        return _TONE[self]


_HOLDING = frozenset(
    {
        CoordinatorState.STARTING,
        CoordinatorState.SERVING,
        CoordinatorState.RESTARTING,
        CoordinatorState.STOPPING,
    }
)
_TONE = {
    CoordinatorState.WAITING: "working",
    CoordinatorState.STARTING: "working",
    CoordinatorState.SERVING: "ok",
    CoordinatorState.RESTARTING: "working",
    CoordinatorState.STOPPING: "working",
    CoordinatorState.STOPPED: "idle",
    CoordinatorState.FAILED: "down",
}


class SourceName(StrEnum):
    """Every source Corral knows, in the default priority order."""

    PROCESS = "process"
    FILE = "file"
    REGISTRY = "registry"
    MDNS = "mdns"
    SCAN = "scan"
    CACHE = "cache"


@dataclass(frozen=True, slots=True)
class Device:
    index: int
    free_bytes: int
    total_bytes: int

    def to_json(self) -> dict[str, int]:
        return {"index": self.index, "free_bytes": self.free_bytes, "total_bytes": self.total_bytes}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    endpoint: Endpoint
    status: Status
    version: str | None = None
    devices: tuple[Device, ...] = ()
    latency_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Sighting:
    """Source S saw endpoint E; `detail` says how (file:line, pid, ...)."""

    endpoint: Endpoint
    source: SourceName
    detail: str = ""


@dataclass(slots=True)
class Backend:
    """One endpoint as the whole chain sees it: every source that saw it, and its live status."""

    endpoint: Endpoint
    sources: list[SourceName] = field(default_factory=list)
    probe: ProbeResult | None = None
    # Other names of this backend (resolving to the same address and port), first seen first.
    names: list[Endpoint] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `--json` contract: exactly these keys, these types."""
        p = self.probe
        if p is None:
            return contract_json(
                self.endpoint, Status.OFFLINE, sources=self.sources, names=self.names
            )
        return contract_json(
            self.endpoint,
            p.status,
            p.version,
            p.devices,
            p.latency_ms,
            self.sources,
            p.error,
            self.names,
        )


def contract_json(
    endpoint: Endpoint,
    status: Status,
    version: str | None = None,
    devices: Sequence[Device] = (),
    latency_ms: float | None = None,
    sources: Sequence[SourceName] = (),
    error: str | None = "not probed",
    names: Sequence[Endpoint] = (),
) -> dict[str, Any]:
    """One backend in the `--json` contract (and the API's items): exactly these keys."""
    return {
        "host": endpoint.host,
        "port": endpoint.port,
        "status": str(status),
        "version": version,
        "devices": [d.to_json() for d in devices],
        "latency_ms": round(latency_ms, 3) if latency_ms is not None else None,
        "sources": [str(s) for s in sources],
        "error": error,
        "names": [str(n) for n in names],
    }


def result_to_json(result: ProbeResult, sources: list[SourceName]) -> dict[str, Any]:
    return Backend(result.endpoint, list(sources), result).to_json()


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """One device memory can be held on: a backend's device (by the index its probe reports,
    which is the `n` of llama.cpp's `RPCn[host:port]` buffers), or one on llama-server's own
    machine (`backend` None, shown as "local"; `device` "host" for its RAM, else a name such
    as "CUDA0")."""

    backend: Endpoint | None
    device: str

    @property
    def backend_name(self) -> str:
        return "local" if self.backend is None else str(self.backend)


@dataclass(frozen=True, slots=True)
class BufferBytes:
    """What llama-server allocated on one device: weights, KV cache (or recurrent state), and
    compute scratch, in bytes."""

    model: int = 0
    kv: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        return self.model + self.kv + self.compute


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """Memory one device gives our llama-server: planned before the start (None: no plan
    given) and used as its log reports it (None: not known, e.g. an adopted llama-server)."""

    ref: DeviceRef
    planned_bytes: int | None = None
    used: BufferBytes | None = None

    @property
    def used_bytes(self) -> int | None:
        return None if self.used is None else self.used.total
