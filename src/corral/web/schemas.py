"""The dashboard's JSON: pydantic models for the OpenAPI schema, and the conversions.

`/api/rpc_backends` items are exactly `corral backends --json` objects (corral.types.Backend
.to_json, the one contract) plus `last_seen` and `in_use`. Registration JSON is shared by the
server (`POST /api/nodes/heartbeat`) and the client (`post_heartbeat`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from corral.endpoint import EndpointError, parse_endpoint
from corral.llama.rpc_cache import shown_path
from corral.store import codec
from corral.store.base import (
    DEFAULT_HEARTBEAT_S,
    BackendRecord,
    CoordinatorRecord,
    Event,
    NodeRegistration,
)
from corral.types import CoordinatorState, Device, DeviceMemory, Status, contract_json
from corral.web.control import CoordinatorStatusLike

StatusName = Literal["ready", "busy", "offline", "incompatible", "not-rpc"]
# Byte counts: 2**53 is exact as a JSON number everywhere (8 PiB is enough memory for anyone).
MAX_BYTES = 2**53
# The endpoint gate (corral.endpoint.parse_endpoint) is the rule; JSON Schema cannot state it
# (placeholders, port ranges, address rules), so the schema names it as a format.
ENDPOINT_FORMAT = "corral-endpoint"


# ---- responses -----------------------------------------------------------------------------


class DeviceOut(BaseModel):
    index: int
    free_bytes: int
    total_bytes: int


class BackendOut(BaseModel):
    """One RPC backend: the `corral backends --json` object plus last_seen and in_use."""

    host: str
    port: int
    status: StatusName
    version: str | None
    devices: list[DeviceOut]
    latency_ms: float | None
    sources: list[str]
    error: str | None
    names: list[str] = Field(description="other names of this backend (same address and port)")
    last_seen: float = Field(description="Unix time the backend was last seen (seconds)")
    in_use: bool = Field(description="The coordinator's llama-server uses this backend")


class DeviceMemoryOut(BaseModel):
    """One device's memory for the coordinator's llama-server."""

    backend: str = Field(
        description="host:port of the backend, or `local`: llama-server's own machine"
    )
    device: str = Field(
        description="the backend's device index (as in its `devices`); for `local`, `host`"
        " (llama-server's RAM) or an accelerator's name"
    )
    planned_bytes: int | None = Field(description="planned before the start; null: no plan")
    used_bytes: int | None = Field(
        description="allocated, as llama-server's log reports it once it serves (to 5 KiB per"
        " buffer); null: not known, e.g. a llama-server Corral adopted"
    )
    model_bytes: int | None = Field(description="of used_bytes: the weights")
    kv_bytes: int | None = Field(description="of used_bytes: the KV cache or recurrent state")
    compute_bytes: int | None = Field(description="of used_bytes: compute and output buffers")


class CoordinatorOut(BaseModel):
    state: CoordinatorState
    tone: str = Field(description="how the page colours the state: ok, working, idle, down")
    pid: int | None
    port: int | None
    model: str | None
    backends: list[str] = Field(description="host:port of each backend in use")
    uptime_s: float | None
    restarts: int
    last_reason: str | None
    tokens_per_second: float | None
    source: Literal["controller", "store", "none"] = Field(
        description="where this view comes from: the live controller, the store, or nowhere"
    )
    memory: list[DeviceMemoryOut] = Field(
        description="per backend and device: bytes planned and used while llama-server runs"
    )


class EventOut(BaseModel):
    kind: str
    message: str
    endpoint: str | None
    ts: float
    data: dict[str, Any]


class LatencyOut(BaseModel):
    count: int
    min: float | None
    p50: float | None
    p90: float | None
    max: float | None
    mean: float | None


class ScansOut(BaseModel):
    requested: int
    completed: int
    failed: int
    running: bool
    last_started: float | None
    last_duration_s: float | None
    last_error: str | None


class CoordinatorFiguresOut(BaseModel):
    state: CoordinatorState
    restarts: int
    tokens_per_second: float | None
    requests_total: int
    requests_failed: int
    requests_in_flight: int
    request_seconds_total: float
    last_request_s: float | None


class BackendCountsOut(BaseModel):
    total: int
    by_status: dict[str, int]
    in_use: int
    serving: int = Field(
        description="backends the coordinator's llama-server holds and serves on; a held"
        " rpc-server cannot be probed, so by_status counts these as busy too"
    )


class MetricsOut(BaseModel):
    backends: BackendCountsOut
    nodes_live: int
    scans: ScansOut
    probe_latency_ms: LatencyOut
    coordinator: CoordinatorFiguresOut
    stream_clients: int
    snapshot_age_s: float | None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    store: str
    snapshot_age_s: float | None


class IntervalOut(BaseModel):
    status: str = Field(description="as the page shows it: the API's status, or `serving`")
    from_: float = Field(alias="from", description="Unix time it began (or the window's start)")
    to: float | None = Field(description="Unix time it ended; null: it still holds")


class BackendHistoryOut(BaseModel):
    endpoint: str
    latency_ms: list[float | None] = Field(description="probe latency at each of `times`")
    timeline: list[IntervalOut] = Field(description="its statuses over the window, oldest first")


class HistoryOut(BaseModel):
    """The last `window_s`, sampled every `step_s`: every list in step with `times`."""

    step_s: float
    window_s: float
    now: float | None = Field(description="Unix time of the last look; null: none yet")
    times: list[float] = Field(description="Unix time of each sample, oldest first")
    tokens_per_second: list[float | None]
    requests: list[int | None] = Field(
        description="requests forwarded through /v1 since the sample before (null: unknown)"
    )
    backends: list[BackendHistoryOut]
    untracked: int = Field(description="backends seen but not kept: past the history's cap")


class AcceptedOut(BaseModel):
    accepted: bool
    detail: str


class HeartbeatOut(BaseModel):
    node_id: str
    endpoint: str
    ttl_s: float


class ErrorOut(BaseModel):
    detail: str


# ---- requests ------------------------------------------------------------------------------


def _integral(value: object) -> object:
    """JSON Schema's `integer` includes 3.0; accept it as 3, nothing else loosened."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    index: JsonInt = Field(ge=0, le=1023)
    free_bytes: JsonInt = Field(ge=0, le=MAX_BYTES)
    total_bytes: JsonInt = Field(ge=0, le=MAX_BYTES)


class HeartbeatIn(BaseModel):
    """A NodeRegistration as JSON (the store codec's form). `endpoint` goes through Corral's
    endpoint gate; `last_heartbeat` is accepted but replaced by the time it was received."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    node_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")
    endpoint: str = Field(
        min_length=3,
        max_length=263,
        json_schema_extra={"format": ENDPOINT_FORMAT},
        description="host:port or [v6]:port of the backend, checked by Corral's endpoint gate"
        " (no placeholders such as coordinator:0, port 1-65535, valid host name or address)",
        examples=["127.0.0.1:50052", "gpu-box.lan:50052", "[::1]:50052"],
    )
    hostname: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._-]+$")
    status: StatusName
    version: str | None = Field(default=None, max_length=32, pattern=r"^[0-9A-Za-z.+-]+$")
    devices: list[DeviceIn] = Field(default_factory=list, max_length=64)
    client: str | None = Field(default=None, max_length=256, pattern=r"^[A-Za-z0-9.:\[\]_-]+$")
    uptime_s: float = Field(default=0.0, ge=0, le=1e10)
    restarts: JsonInt = Field(default=0, ge=0, le=2**31)
    heartbeat_s: float = Field(default=DEFAULT_HEARTBEAT_S, ge=0.1, le=3600)
    last_heartbeat: float | None = Field(default=None, ge=0, le=1e11)
    cache_dir: str | None = Field(
        default=None, max_length=4096, description="rpc-server's tensor cache directory (-c)"
    )
    cache_bytes: Annotated[int | None, BeforeValidator(_integral)] = Field(
        default=None, ge=0, le=MAX_BYTES, description="Bytes the cache held at the last measure"
    )
    cache_capped: bool = Field(
        default=False, description="The measure stopped at its bound: at least cache_bytes"
    )

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, value: str | None) -> str | None:
        # A path may hold any character: shown, not refused (the codec takes printable text).
        return None if value is None else shown_path(value)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        try:
            return str(parse_endpoint(value))
        except EndpointError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _storable(self) -> HeartbeatIn:
        # The store refuses what its codec would not read back: find out here, as a 422.
        try:
            codec.node_to_json(self.to_registration(received_at=time.time()))
        except codec.CodecError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_registration(self, received_at: float) -> NodeRegistration:
        return NodeRegistration(
            node_id=self.node_id,
            endpoint=parse_endpoint(self.endpoint),
            hostname=self.hostname,
            status=Status(self.status),
            version=self.version,
            devices=tuple(Device(d.index, d.free_bytes, d.total_bytes) for d in self.devices),
            client=self.client,
            uptime_s=self.uptime_s,
            restarts=self.restarts,
            heartbeat_s=self.heartbeat_s,
            last_heartbeat=received_at,
            cache_dir=self.cache_dir,
            cache_bytes=self.cache_bytes,
            cache_capped=self.cache_capped,
        )


class RestartIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(default="asked from the dashboard", min_length=1, max_length=200)


# ---- conversions ---------------------------------------------------------------------------


def registration_to_json(reg: NodeRegistration) -> dict[str, Any]:
    """The wire form of a registration: the store codec's JSON (raises CodecError if invalid)."""
    return codec.node_to_json(reg)


def backend_to_json(rec: BackendRecord, in_use: bool) -> dict[str, Any]:
    out = contract_json(
        rec.endpoint,
        rec.status,
        rec.version,
        rec.devices,
        rec.latency_ms,
        rec.sources,
        rec.error,
        rec.names,
    )
    out["last_seen"] = rec.last_seen
    out["in_use"] = in_use
    return out


def is_serving(item: Mapping[str, Any]) -> bool:
    """An `/api/rpc_backends` item our coordinator holds and serves on. An rpc-server serves one
    client at a time, so a held one cannot be probed and its status reads `busy` (the contract's
    value, kept); the page shows it as "serving" (index.html's `shownOf`, the same rule) and the
    metrics count it as such. Held but offline stays offline: that is trouble."""
    return bool(item["in_use"]) and item["status"] == Status.BUSY.value


def event_to_json(ev: Event) -> dict[str, Any]:
    return {
        "kind": str(ev.kind),
        "message": ev.message,
        "endpoint": str(ev.endpoint) if ev.endpoint else None,
        "ts": ev.ts,
        "data": dict(ev.data),
    }


def memory_to_json(memory: Iterable[DeviceMemory]) -> list[dict[str, Any]]:
    out = []
    for m in memory:
        used = m.used
        out.append(
            {
                "backend": m.ref.backend_name,
                "device": m.ref.device,
                "planned_bytes": m.planned_bytes,
                "used_bytes": m.used_bytes,
                "model_bytes": None if used is None else used.model,
                "kv_bytes": None if used is None else used.kv,
                "compute_bytes": None if used is None else used.compute,
            }
        )
    return out


def coordinator_from_status(
    st: CoordinatorStatusLike, tps_fallback: float | None
) -> dict[str, Any]:
    tps = st.tokens_per_second if st.tokens_per_second is not None else tps_fallback
    return {
        "state": str(st.state),
        "tone": st.state.tone,
        "pid": st.pid,
        "port": st.port,
        "model": st.model,
        "backends": [str(ep) for ep in st.backends],
        "uptime_s": st.uptime_s,
        "restarts": st.restarts,
        "last_reason": st.last_reason,
        "tokens_per_second": tps,
        "source": "controller",
        "memory": memory_to_json(st.memory),
    }


def coordinator_from_record(
    rec: CoordinatorRecord | None, tps: float | None, now: float | None = None
) -> dict[str, Any]:
    if rec is None:
        return {
            "state": str(CoordinatorState.STOPPED),
            "tone": CoordinatorState.STOPPED.tone,
            "pid": None,
            "port": None,
            "model": None,
            "backends": [],
            "uptime_s": None,
            "restarts": 0,
            "last_reason": None,
            "tokens_per_second": None,
            "source": "none",
            "memory": [],
        }
    now = time.time() if now is None else now
    running = rec.state in (CoordinatorState.STARTING, CoordinatorState.SERVING)
    uptime = max(0.0, now - rec.started_at) if running and rec.started_at else None
    return {
        "state": str(rec.state),
        "tone": rec.state.tone,
        "pid": rec.pid,
        "port": rec.port,
        "model": rec.model,
        "backends": [str(ep) for ep in rec.backends],
        "uptime_s": uptime,
        "restarts": rec.restarts,
        "last_reason": rec.last_reason,
        "tokens_per_second": tps if running else None,
        "source": "store",
        "memory": memory_to_json(rec.memory),
    }


def endpoints_in_use(coordinator: dict[str, Any]) -> set[str]:
    if not CoordinatorState(coordinator["state"]).holds_backends:
        return set()
    return set(coordinator["backends"])
