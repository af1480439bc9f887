"""The codec: every record type round-trips; junk of any shape is refused with where and why."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.endpoint import PLACEHOLDER_HOSTS, Endpoint, parse_endpoint
from corral.store import codec
from corral.store.base import (
    Change,
    Event,
    EventKind,
)
from tests.support.records import NOW, backend, coordinator, event, node

pytestmark = pytest.mark.timeout(30)  # bounded even when something hangs


def gate_accepts(ep: Endpoint) -> bool:
    return (
        parse_endpoint(str(ep)) == ep
        and 0 < ep.port < 65536
        and ep.host not in PLACEHOLDER_HOSTS
        and ep.host not in ("0.0.0.0", "::")
    )


def roundtrip(obj: dict[str, Any]) -> Any:
    return json.loads(codec.dumps(obj, "test"))


def test_every_record_type_round_trips() -> None:
    rec = backend()
    assert (
        codec.backend_from_json(roundtrip(codec.backend_to_json(rec, written_at=NOW)), "t") == rec
    )
    reg = node()
    assert codec.node_from_json(roundtrip(codec.node_to_json(reg)), "t") == reg
    coord = coordinator()
    assert codec.coordinator_from_json(roundtrip(codec.coordinator_to_json(coord)), "t") == coord
    ev = event()
    assert codec.event_from_json(roundtrip(codec.event_to_json(ev)), "t") == ev
    change = Change("events", ev)
    assert codec.change_from_json(roundtrip(codec.change_to_json(change, "me")), "t") == (
        change,
        "me",
    )


def test_stale_when_written_before_the_reader_opened() -> None:
    body = codec.backend_to_json(backend(), written_at=NOW)
    assert codec.backend_from_json(body, "t", fresh_since=NOW + 1).stale
    assert not codec.backend_from_json(body, "t", fresh_since=NOW - 1).stale
    # An explicit stale flag survives a fresh write (a catch-up push of an unverified record).
    stale_body = codec.backend_to_json(backend(stale=True), written_at=NOW)
    assert codec.backend_from_json(stale_body, "t", fresh_since=NOW - 1).stale


GOOD = codec.backend_to_json(backend(), written_at=NOW)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (json.dumps({**GOOD, "endpoint": "coordinator:0"}), "field 'endpoint'"),
        (json.dumps({**GOOD, "endpoint": "coordinator:50052"}), "placeholder host"),
        (json.dumps({**GOOD, "endpoint": "10.0.0.1:0"}), "port 0 is a placeholder"),
        (json.dumps({**GOOD, "endpoint": "0.0.0.0:50052"}), "unspecified address"),
        (json.dumps({**GOOD, "endpoint": ["10.0.0.1", 1]}), "expected a 'host:port' string"),
        (json.dumps({**GOOD, "status": "great"}), "field 'status': not a status"),
        (json.dumps({**GOOD, "latency_ms": "fast"}), "field 'latency_ms': expected a number"),
        (json.dumps({**GOOD, "in_use": 1}), "field 'in_use': expected true or false"),
        (json.dumps({**GOOD, "first_seen": 1e300}), "field 'first_seen'"),
        (json.dumps({**GOOD, "devices": [{"index": True}]}), "field 'devices'[0]"),
        (json.dumps({**GOOD, "sources": ["rumour"]}), "not a source name"),
        (json.dumps({**GOOD, "version": "\x1b[2J"}), "control characters"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "last_seen"}), "'last_seen': missing"),
        ('{"endpoint": "10.0.0.1:1", ', "not JSON"),
        ('{"latency_ms": NaN}', "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (b"\xff\xfe junk", "not UTF-8"),
        ("[" * 50_000 + "]" * 50_000, "larger than"),
        ("[" * 20_000 + "]" * 20_000, "nested too deeply"),
        ('"' + "x" * (1 << 20) + '"', "larger than"),
    ],
)
def test_poison_is_refused_with_where_and_why(raw: str | bytes, why: str) -> None:
    with pytest.raises(codec.CodecError) as info:
        codec.decode(raw, "redis key corral:backends", codec.backend_from_json)
    assert str(info.value).startswith("redis key corral:backends")
    assert why in str(info.value)


def test_writing_refuses_what_reading_would_refuse() -> None:
    with pytest.raises(codec.CodecError, match="placeholder"):
        codec.backend_to_json(backend(Endpoint("coordinator", 0)), written_at=NOW)
    with pytest.raises(codec.CodecError, match="canonical"):
        codec.backend_to_json(backend(Endpoint("GPU-Box", 50052)), written_at=NOW)
    with pytest.raises(codec.CodecError, match="node id"):
        codec.node_to_json(node(node_id="a b*"))
    with pytest.raises(codec.CodecError, match="not representable"):
        codec.event_to_json(Event(EventKind.WARNING, "x", data={"obj": object()}))
    with pytest.raises(codec.CodecError, match="larger than"):
        codec.event_to_json(Event(EventKind.WARNING, "x", data={"blob": "x" * (1 << 20)}))
    # Free text is cleaned rather than refused: an error message may quote anything.
    ev = codec.event_to_json(Event(EventKind.WARNING, "bad \x1b[31mred\x00", ts=NOW))
    assert "\x1b" not in ev["message"] and "\x00" not in ev["message"]


def test_legacy_metadata_keeps_good_items_and_names_bad_ones() -> None:
    meta = {
        "nodes": [],
        "rpc_backends": [
            "10.0.0.1:50052",
            {"host": "10.0.0.2", "port": 50052},
            {"host": "10.0.0.3", "port": "50053"},
            {"host": "::1", "port": 50054},
            "coordinator:0",
            {"host": "10.0.0.4", "port": 0},
            {"host": "10.0.0.5", "port": ""},
            {"host": "10.0.0.6", "port": True},
            42,
            "10.0.0.1:50052",
        ],
    }
    good, warnings = codec.legacy_backends_from_json(meta, "redis key sollol:router:metadata")
    assert good == [
        Endpoint("10.0.0.1", 50052),
        Endpoint("10.0.0.2", 50052),
        Endpoint("10.0.0.3", 50053),
        Endpoint("::1", 50054),
    ]
    assert len(warnings) == 5
    assert all(w.startswith("redis key sollol:router:metadata: rpc_backends[") for w in warnings)
    assert "rpc_backends[4]" in warnings[0] and "placeholder" in warnings[0]
    assert codec.legacy_backends_from_json({"metrics": {}}, "k") == ([], [])
    with pytest.raises(codec.CodecError, match="expected a list"):
        codec.legacy_backends_from_json({"rpc_backends": "10.0.0.1:1"}, "k")


# --- fuzzing ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
endpoint_texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["coordinator:0", "10.0.0.1:0", "0.0.0.0:1", "[::]:5", "host:1", "x:99999", "[::1]:7"]
    ),
    st.builds(lambda h, p: f"{h}:{p}", st.text(max_size=12), st.integers(-5, 70000)),
)
FIELDS: dict[str, tuple[Callable[[object, str], object], dict[str, Any]]] = {
    "backend": (codec.backend_from_json, GOOD),
    "node": (codec.node_from_json, codec.node_to_json(node())),
    "coordinator": (codec.coordinator_from_json, codec.coordinator_to_json(coordinator())),
    "event": (codec.event_from_json, codec.event_to_json(event())),
}
PARSERS = [p for p, _ in FIELDS.values()] + [
    codec.change_from_json,
    codec.legacy_backends_from_json,
]


def endpoints_in(result: object) -> list[Endpoint]:
    if isinstance(result, Endpoint):
        return [result]
    if isinstance(result, tuple | list):
        return [ep for item in result for ep in endpoints_in(item)]
    eps = [getattr(result, name, None) for name in ("endpoint",)]
    eps += list(getattr(result, "backends", ()))
    return [ep for ep in eps if isinstance(ep, Endpoint)]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300), which=st.sampled_from(PARSERS))
def test_fuzz_raw_bytes_only_codec_errors(raw: bytes | str, which: Any) -> None:
    try:
        result = codec.decode(raw, "fuzz", which)
    except codec.CodecError:
        return
    assert all(gate_accepts(ep) for ep in endpoints_in(result))


@FUZZ
@given(value=json_values, which=st.sampled_from(PARSERS))
def test_fuzz_json_shapes_only_codec_errors(value: object, which: Any) -> None:
    try:
        result = which(value, "fuzz")
    except codec.CodecError:
        return
    assert all(gate_accepts(ep) for ep in endpoints_in(result))


@FUZZ
@given(
    kind=st.sampled_from(sorted(FIELDS)),
    data=st.data(),
    junk=json_values | endpoint_texts,
)
def test_fuzz_one_bad_field_in_a_good_record(kind: str, data: st.DataObject, junk: object) -> None:
    parse, good = FIELDS[kind]
    key = data.draw(st.sampled_from(sorted(good)))
    try:
        result = parse({**good, key: junk}, "fuzz")
    except codec.CodecError as exc:
        assert str(exc).startswith("fuzz")
        return
    assert all(gate_accepts(ep) for ep in endpoints_in(result))


@FUZZ
@given(items=st.lists(endpoint_texts | json_values, max_size=8))
def test_fuzz_legacy_items(items: list[object]) -> None:
    good, warnings = codec.legacy_backends_from_json({"rpc_backends": items}, "fuzz")
    assert all(gate_accepts(ep) for ep in good)
    assert len(good) + len(warnings) <= len(items)
    assert all(w.startswith("fuzz: rpc_backends[") for w in warnings)
