"""Schemathesis hooks for test_web_schema.py, loaded in its process through SCHEMATHESIS_HOOKS.

The heartbeat's `endpoint` has `format: corral-endpoint`: Corral's endpoint gate, which no JSON
Schema pattern can state (placeholders, port ranges, address rules). This strategy makes only
endpoints the gate accepts, so "schema-valid data must be accepted" is checked for real; the
pattern beside the format is a superset, so "schema-invalid data must be refused" holds too.
"""

from __future__ import annotations

import importlib.util

from hypothesis import strategies as st

_octet = st.integers(0, 255)
# First octet 1-223: never 0.0.0.0 (unspecified), multicast or broadcast.
_ipv4 = st.tuples(st.integers(1, 223), _octet, _octet, _octet).map(
    lambda t: ".".join(str(x) for x in t)
)
# Several labels, the last one letters: a host name, never a placeholder or an IP look-alike.
_names = st.from_regex(r"[a-z][a-z0-9-]{0,14}[a-z0-9](\.[a-z]{2,10}){1,2}", fullmatch=True)
_ipv6 = st.sampled_from(["[::1]", "[fe80::1]", "[2001:db8::5]", "[fd00::a:b]"])
_endpoint = st.tuples(st.one_of(_ipv4, _names, _ipv6), st.integers(1, 65535)).map(
    lambda t: f"{t[0]}:{t[1]}"
)

# Imported by mypy and ruff too; without schemathesis there is nothing to register.
if importlib.util.find_spec("schemathesis") is not None:
    import schemathesis

    schemathesis.openapi.format("corral-endpoint", _endpoint)
