"""Records <-> JSON, strictly. Everything read back from Redis or SQLite passes through here.

Pure functions. Decoding checks size, JSON syntax, every type and range, and sends every endpoint
through the endpoint gate; anything else raises CodecError("where: field: why"). Encoding runs
the decoder on its own output, so nothing a reader would refuse is ever written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from corral.endpoint import Endpoint, EndpointError, parse_endpoint
from corral.store.base import (
    TOPICS,
    BackendRecord,
    Change,
    CoordinatorRecord,
    Event,
    EventKind,
    NodeRegistration,
)
from corral.types import (
    BufferBytes,
    CoordinatorState,
    Device,
    DeviceMemory,
    DeviceRef,
    SourceName,
    Status,
)

MAX_VALUE_BYTES = 64 * 1024  # one stored value; a coordinator with 1000 backends fits
MAX_TEXT = 4096  # messages, errors, reasons
MAX_NAME = 256  # versions, host names, client addresses
MAX_DEVICES = 64
MAX_LIST = 1024
MAX_NAMES = 16  # other names of one backend
MAX_MEMORY = 128  # devices in the coordinator's memory view (1000 backends still fit beside)
MAX_DEVICE_NAME = 160
MAX_TS = 1e11  # seconds since the epoch; later than this is junk, not a clock
MAX_BYTES = 2**63 - 1
_NODE_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")

T = TypeVar("T")


class CodecError(ValueError):
    """A stored value that is not a valid record; the message says where and why."""


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _printable(text: str, *, multiline: bool) -> bool:
    # Control characters in stored text could drive the terminal that shows it.
    allowed = "\n\t" if multiline else ""
    return all(ch.isprintable() or ch in allowed for ch in text)


def clean_text(text: str, max_len: int = MAX_TEXT) -> str:
    """Free text about to be written: control characters replaced, length capped."""
    cleaned = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)
    return cleaned if len(cleaned) <= max_len else cleaned[: max_len - 1] + "…"


class _Fields:
    """Typed access to one JSON object; every failure names the field and the bad value."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise CodecError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        self.obj: dict[str, Any] = obj
        self.where = where

    def fail(self, key: str, why: str) -> CodecError:
        return CodecError(f"{self.where}: field {key!r}: {why}")

    def raw(self, key: str) -> object:
        if key not in self.obj:
            raise self.fail(key, "missing")
        return self.obj[key]

    def text(self, key: str, max_len: int = MAX_NAME, *, multiline: bool = False) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {show(value)}")
        if len(value) > max_len:
            raise self.fail(key, f"longer than {max_len} characters")
        if not _printable(value, multiline=multiline):
            raise self.fail(key, f"control characters in {show(value)}")
        return value

    def opt_text(self, key: str, max_len: int = MAX_NAME, *, multiline: bool = False) -> str | None:
        if self.obj.get(key) is None:
            return None
        return self.text(key, max_len, multiline=multiline)

    def number(self, key: str, lo: float, hi: float) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {show(value)}")
        # Compare before float(): a huge int would overflow the conversion.
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"not a finite number: {show(value)}")
        if not lo <= value <= hi:
            raise self.fail(key, f"{show(value)} outside {lo:g}..{hi:g}")
        return float(value)

    def opt_number(self, key: str, lo: float, hi: float) -> float | None:
        return None if self.obj.get(key) is None else self.number(key, lo, hi)

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        if default is not None and key not in self.obj:
            return default
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {show(value)}")
        if not lo <= value <= hi:
            raise self.fail(key, f"{show(value)} outside {lo}..{hi}")
        return value

    def opt_integer(self, key: str, lo: int, hi: int) -> int | None:
        return None if self.obj.get(key) is None else self.integer(key, lo, hi)

    def flag(self, key: str) -> bool:
        value = self.obj.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {show(value)}")
        return value

    def items(self, key: str, max_items: int = MAX_LIST) -> list[object]:
        value = self.obj.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {show(value)}")
        if len(value) > max_items:
            raise self.fail(key, f"more than {max_items} items")
        return value

    def endpoint(self, key: str) -> Endpoint:
        return endpoint_from_json(self.raw(key), f"{self.where}: field {key!r}")

    def opt_endpoint(self, key: str) -> Endpoint | None:
        return None if self.obj.get(key) is None else self.endpoint(key)

    def status(self, key: str) -> Status:
        value = self.raw(key)
        if not isinstance(value, str) or value not in Status._value2member_map_:
            raise self.fail(key, f"not a status: {show(value)}")
        return Status(value)


# --- JSON text ------------------------------------------------------------------------------


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str, where: str) -> object:
    """Bounded, strict JSON text -> Python value."""
    if isinstance(raw, str):
        if len(raw) > MAX_VALUE_BYTES:
            raise CodecError(f"{where}: value larger than {MAX_VALUE_BYTES} bytes")
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise CodecError(f"{where}: value is not valid text") from None
    if len(raw) > MAX_VALUE_BYTES:
        raise CodecError(f"{where}: value larger than {MAX_VALUE_BYTES} bytes ({len(raw)})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"{where}: value is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise CodecError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:
        raise CodecError(f"{where}: not JSON ({exc})") from None


def dumps(obj: dict[str, Any], where: str) -> str:
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CodecError(f"{where}: not representable as JSON ({exc})") from None
    if len(text.encode("utf-8")) > MAX_VALUE_BYTES:
        raise CodecError(f"{where}: value larger than {MAX_VALUE_BYTES} bytes")
    return text


def decode(raw: bytes | str, where: str, parse: Callable[[object, str], T]) -> T:
    return parse(loads(raw, where), where)


def stored_backend(raw: bytes | str, where: str, key: str, fresh_since: float) -> BackendRecord:
    """A backend record read back under `key` (its endpoint): a record filed under another
    endpoint's key is refused, not passed on."""
    rec = decode(raw, where, lambda o, w: backend_from_json(o, w, fresh_since=fresh_since))
    if str(rec.endpoint) != key:
        raise CodecError(f"{where}: holds backend {rec.endpoint}")
    return rec


def stored_node(raw: bytes | str, where: str, node_id: str) -> NodeRegistration:
    """A node registration read back under `node_id`: one filed under another id is refused."""
    reg = decode(raw, where, node_from_json)
    if reg.node_id != node_id:
        raise CodecError(f"{where}: holds node {reg.node_id!r}")
    return reg


# --- endpoints and names ----------------------------------------------------------------------


def endpoint_from_json(value: object, where: str) -> Endpoint:
    """The endpoint gate, for stored values."""
    if not isinstance(value, str):
        raise CodecError(f"{where}: expected a 'host:port' string, got {show(value)}")
    try:
        return parse_endpoint(value, where=where)
    except EndpointError as exc:
        raise CodecError(str(exc)) from None


def endpoint_key(endpoint: Endpoint, where: str = "endpoint") -> str:
    """The stored form of an endpoint; refuses one the gate would refuse on the way back."""
    text = str(endpoint)
    if endpoint_from_json(text, where) != endpoint:
        raise CodecError(f"{where}: not in canonical form: {text!r}")
    return text


def check_node_id(node_id: object, where: str) -> str:
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
        raise CodecError(
            f"{where}: node id must be 1-128 of A-Z a-z 0-9 . _ : @ -, got {show(node_id)}"
        )
    return node_id


def _devices(f: _Fields) -> tuple[Device, ...]:
    out = []
    for i, item in enumerate(f.items("devices", MAX_DEVICES)):
        d = _Fields(item, f"{f.where}: field 'devices'[{i}]")
        out.append(
            Device(
                d.integer("index", 0, 1023),
                d.integer("free_bytes", 0, MAX_BYTES),
                d.integer("total_bytes", 0, MAX_BYTES),
            )
        )
    return tuple(out)


def _sources(f: _Fields) -> tuple[SourceName, ...]:
    out: list[SourceName] = []
    for item in f.items("sources", len(SourceName) * 2):
        if not isinstance(item, str) or item not in SourceName._value2member_map_:
            raise f.fail("sources", f"not a source name: {show(item)}")
        if SourceName(item) not in out:
            out.append(SourceName(item))
    return tuple(out)


def _names(f: _Fields) -> tuple[Endpoint, ...]:
    return tuple(
        endpoint_from_json(item, f"{f.where}: field 'names'[{i}]")
        for i, item in enumerate(f.items("names", MAX_NAMES))
    )


def _check(built: dict[str, Any], where: str, parse: Callable[[object, str], object]) -> None:
    """Encoding check: the reader must accept what we are about to write."""
    parse(loads(dumps(built, where), where), where)


# --- backends ---------------------------------------------------------------------------------


def backend_to_json(rec: BackendRecord, *, written_at: float) -> dict[str, Any]:
    where = f"backend {rec.endpoint}"
    out = {
        "endpoint": endpoint_key(rec.endpoint, where),
        "status": str(rec.status),
        "version": rec.version,
        "devices": [d.to_json() for d in rec.devices],
        "sources": [str(s) for s in rec.sources],
        "latency_ms": rec.latency_ms,
        "error": None if rec.error is None else clean_text(rec.error),
        "first_seen": rec.first_seen,
        "last_seen": rec.last_seen,
        "in_use": rec.in_use,
        "client": rec.client,
        "stale": rec.stale,
        "names": [endpoint_key(n, f"{where}: names") for n in rec.names],
        "written_at": written_at,
    }
    _check(out, where, backend_from_json)
    return out


def backend_from_json(obj: object, where: str, *, fresh_since: float = 0.0) -> BackendRecord:
    """`fresh_since`: records written before it (an earlier run, another machine) are stale."""
    f = _Fields(obj, where)
    written_at = f.number("written_at", 0, MAX_TS)
    return BackendRecord(
        endpoint=f.endpoint("endpoint"),
        status=f.status("status"),
        version=f.opt_text("version"),
        devices=_devices(f),
        sources=_sources(f),
        latency_ms=f.opt_number("latency_ms", 0, 1e9),
        error=f.opt_text("error", MAX_TEXT, multiline=True),
        first_seen=f.number("first_seen", 0, MAX_TS),
        last_seen=f.number("last_seen", 0, MAX_TS),
        in_use=f.flag("in_use"),
        client=f.opt_text("client"),
        stale=f.flag("stale") or written_at < fresh_since,
        names=_names(f),
    )


# --- node registrations -----------------------------------------------------------------------


def node_to_json(reg: NodeRegistration) -> dict[str, Any]:
    where = f"node {reg.node_id!r}"
    out = {
        "node_id": check_node_id(reg.node_id, where),
        "endpoint": endpoint_key(reg.endpoint, where),
        "hostname": reg.hostname,
        "status": str(reg.status),
        "version": reg.version,
        "devices": [d.to_json() for d in reg.devices],
        "client": reg.client,
        "uptime_s": reg.uptime_s,
        "restarts": reg.restarts,
        "heartbeat_s": reg.heartbeat_s,
        "last_heartbeat": reg.last_heartbeat,
        "cache_dir": reg.cache_dir,
        "cache_bytes": reg.cache_bytes,
        "cache_capped": reg.cache_capped,
    }
    _check(out, where, node_from_json)
    return out


def node_from_json(obj: object, where: str) -> NodeRegistration:
    f = _Fields(obj, where)
    return NodeRegistration(
        node_id=check_node_id(f.raw("node_id"), f"{where}: field 'node_id'"),
        endpoint=f.endpoint("endpoint"),
        hostname=f.text("hostname"),
        status=f.status("status"),
        version=f.opt_text("version"),
        devices=_devices(f),
        client=f.opt_text("client"),
        uptime_s=f.number("uptime_s", 0, MAX_TS),
        restarts=f.integer("restarts", 0, 2**31, default=0),
        heartbeat_s=f.number("heartbeat_s", 0.01, 86400),
        last_heartbeat=f.number("last_heartbeat", 0, MAX_TS),
        cache_dir=f.opt_text("cache_dir", MAX_TEXT),
        cache_bytes=f.opt_integer("cache_bytes", 0, MAX_BYTES),
        cache_capped=f.flag("cache_capped"),
    )


# --- coordinator ------------------------------------------------------------------------------


def coordinator_to_json(rec: CoordinatorRecord) -> dict[str, Any]:
    where = "coordinator"
    out = {
        "state": str(rec.state),
        "backends": [endpoint_key(ep, f"{where} backend") for ep in rec.backends],
        "pid": rec.pid,
        "port": rec.port,
        "model": rec.model,
        "started_at": rec.started_at,
        "restarts": rec.restarts,
        "last_reason": None if rec.last_reason is None else clean_text(rec.last_reason),
        "updated_at": rec.updated_at,
        "memory": [_memory_to_json(m, where) for m in rec.memory],
    }
    _check(out, where, coordinator_from_json)
    return out


def _memory_to_json(m: DeviceMemory, where: str) -> dict[str, Any]:
    used = m.used
    return {
        "backend": None if m.ref.backend is None else endpoint_key(m.ref.backend, where),
        "device": m.ref.device,
        "planned_bytes": m.planned_bytes,
        "used": None
        if used is None
        else {"model": used.model, "kv": used.kv, "compute": used.compute},
    }


def _memory(f: _Fields) -> tuple[DeviceMemory, ...]:
    out = []
    for i, item in enumerate(f.items("memory", MAX_MEMORY)):
        m = _Fields(item, f"{f.where}: field 'memory'[{i}]")
        device = m.text("device", MAX_DEVICE_NAME)
        if not device or " " in device:
            raise m.fail("device", f"not a device name: {show(device)}")
        used = None
        if m.obj.get("used") is not None:
            u = _Fields(m.obj["used"], f"{m.where}: field 'used'")
            used = BufferBytes(
                u.integer("model", 0, MAX_BYTES),
                u.integer("kv", 0, MAX_BYTES),
                u.integer("compute", 0, MAX_BYTES),
            )
        out.append(
            DeviceMemory(
                DeviceRef(m.opt_endpoint("backend"), device),
                planned_bytes=m.opt_integer("planned_bytes", 0, MAX_BYTES),
                used=used,
            )
        )
    return tuple(out)


def coordinator_from_json(obj: object, where: str) -> CoordinatorRecord:
    f = _Fields(obj, where)
    text = f.text("state", 32)
    try:
        state = CoordinatorState(text)
    except ValueError:
        names = ", ".join(CoordinatorState)
        raise f.fail("state", f"not a coordinator state ({names}): {show(text)}") from None
    backends = tuple(
        endpoint_from_json(item, f"{where}: field 'backends'[{i}]")
        for i, item in enumerate(f.items("backends"))
    )
    return CoordinatorRecord(
        state=state,
        backends=backends,
        pid=f.opt_integer("pid", 1, 2**31),
        port=f.opt_integer("port", 1, 65535),
        model=f.opt_text("model", MAX_TEXT),
        started_at=f.opt_number("started_at", 0, MAX_TS),
        restarts=f.integer("restarts", 0, 2**31, default=0),
        last_reason=f.opt_text("last_reason", MAX_TEXT, multiline=True),
        updated_at=f.number("updated_at", 0, MAX_TS),
        memory=_memory(f),
    )


# --- events and change notifications ---------------------------------------------------------


def event_to_json(event: Event) -> dict[str, Any]:
    where = f"event {event.kind}"
    out = {
        "kind": str(event.kind),
        "message": clean_text(event.message),
        "endpoint": None if event.endpoint is None else endpoint_key(event.endpoint, where),
        "ts": event.ts,
        "data": event.data,
    }
    _check(out, where, event_from_json)
    return out


def event_from_json(obj: object, where: str) -> Event:
    f = _Fields(obj, where)
    kind = f.raw("kind")
    if not isinstance(kind, str) or kind not in EventKind._value2member_map_:
        raise f.fail("kind", f"not an event kind: {show(kind)}")
    data = f.obj.get("data", {})
    if not isinstance(data, dict):
        raise f.fail("data", f"expected a JSON object, got {show(data)}")
    return Event(
        kind=EventKind(kind),
        message=f.text("message", MAX_TEXT, multiline=True),
        endpoint=f.opt_endpoint("endpoint"),
        ts=f.number("ts", 0, MAX_TS),
        data=data,
    )


def change_to_json(change: Change, origin: str) -> dict[str, Any]:
    out = {
        "topic": change.topic,
        "origin": origin,
        "event": None if change.event is None else event_to_json(change.event),
    }
    _check(out, "change", change_from_json)
    return out


def change_from_json(obj: object, where: str) -> tuple[Change, str]:
    """A change notification and the id of the store instance that sent it."""
    f = _Fields(obj, where)
    topic = f.text("topic", 32)
    if topic not in TOPICS:
        raise f.fail("topic", f"not a topic: {show(topic)}")
    origin = f.text("origin", 64)
    raw_event = f.obj.get("event")
    event = None if raw_event is None else event_from_json(raw_event, f"{where}: field 'event'")
    return Change(topic, event), origin


# --- the older design's Redis metadata ---------------------------------------------------------


def legacy_backends_from_json(obj: object, where: str) -> tuple[list[Endpoint], list[str]]:
    """`{"rpc_backends": ["h:p" | {"host": h, "port": p}, ...]}` -> endpoints, per-item warnings.

    Whole-value problems raise CodecError; one bad item is a warning and the rest survive.
    """
    f = _Fields(obj, where)
    good: list[Endpoint] = []
    warnings: list[str] = []
    for i, item in enumerate(f.items("rpc_backends")):
        item_where = f"{where}: rpc_backends[{i}]"
        try:
            ep = _legacy_item(item, item_where)
        except CodecError as exc:
            warnings.append(f"{exc}; dropped")
            continue
        if ep not in good:
            good.append(ep)
    return good, warnings


def _legacy_item(item: object, where: str) -> Endpoint:
    if isinstance(item, str):
        return endpoint_from_json(item, where)
    f = _Fields(item, where)
    host = f.text("host")
    port = f.raw("port")
    # The older writers stored the port as an int or as a string of digits.
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise f.fail("port", f"expected a port number, got {show(port)}")
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise f.fail("port", f"out of range 1-65535: {show(port)}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return endpoint_from_json(f"{host}:{port}", where)
