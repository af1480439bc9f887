"""Sample records, one of each kind the store holds, every field set to something telling.

`backend()` and `node()` take keyword overrides; `NOW` is a fixed time (seconds since the epoch)
the samples are stamped with, so they compare equal across runs.
"""

from __future__ import annotations

from typing import Any

from corral.endpoint import Endpoint
from corral.store.base import BackendRecord, CoordinatorRecord, Event, EventKind, NodeRegistration
from corral.types import CoordinatorState, Device, SourceName, Status

EP = Endpoint("10.1.2.3", 50052)
EP6 = Endpoint("fd00::1", 50053)
NOW = 1_700_000_000.0


def backend(endpoint: Endpoint = EP, **kw: Any) -> BackendRecord:
    fields: dict[str, Any] = {
        "status": Status.BUSY,
        "version": "3.0.0",
        "devices": (Device(0, 1 << 30, 1 << 31), Device(1, 0, 5)),
        "sources": (SourceName.FILE, SourceName.SCAN),
        "latency_ms": 1.25,
        "error": "held by 10.0.0.9",
        "first_seen": NOW - 100,
        "last_seen": NOW,
        "in_use": True,
        "client": "10.0.0.9:40000",
    }
    fields.update(kw)
    return BackendRecord(endpoint, **fields)


def node(**kw: Any) -> NodeRegistration:
    fields: dict[str, Any] = {
        "node_id": "6f1c2b1e-aaaa-4bbb-8ccc-123456789abc",
        "endpoint": EP6,
        "hostname": "gpu-box",
        "status": Status.READY,
        "version": "3.0.0",
        "devices": (Device(0, 10, 20),),
        "client": None,
        "uptime_s": 12.5,
        "restarts": 2,
        "heartbeat_s": 0.5,
        "last_heartbeat": NOW,
    }
    fields.update(kw)
    return NodeRegistration(**fields)


def coordinator() -> CoordinatorRecord:
    return CoordinatorRecord(
        CoordinatorState.SERVING,
        (EP, EP6),
        4242,
        8080,
        "/m/tiny.gguf",
        NOW - 5,
        3,
        "backend lost",
        NOW,
    )


def event() -> Event:
    return Event(EventKind.BACKEND_STATUS, "ready -> busy", EP, NOW, {"from": "ready", "n": [1]})
