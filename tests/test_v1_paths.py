"""/v1 forwards an allow-list: the OpenAI-compatible routes, by exact path and method; every
other path, however spelled (encoded dots and slashes, dot segments, trailing slashes), is
refused with a reason before anything reaches llama-server."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.web.v1_paths import V1_ROUTES, Refused, v1_route


def test_every_allowed_route_is_forwarded_with_its_methods_only() -> None:
    for route, methods in V1_ROUTES.items():
        for method in methods:
            assert v1_route(f"/v1/{route}".encode(), method) == route
        refused = v1_route(f"/v1/{route}".encode(), "DELETE")
        assert isinstance(refused, Refused) and refused.status == 405


def test_llama_servers_other_routes_are_out_of_reach() -> None:
    for raw in [
        b"/v1/%2e%2e/props",
        b"/v1/%2E%2E/slots",
        b"/v1/..%2Fmetrics",
        b"/v1/../props",
        b"/v1/./models",
        b"/v1//models",
        b"/v1/models/",
        b"/v1/chat%2Fcompletions",
        b"/v1/props",
        b"/v1/slots",
        b"/v1/" + b"a" * 300,
        "/v1/modèls".encode(),
    ]:
        refused = v1_route(raw, "GET")
        assert isinstance(refused, Refused) and refused.status == 404, raw
        assert refused.detail


@given(st.binary(max_size=80), st.sampled_from(["GET", "POST", "PUT", "HEAD"]))
def test_any_path_is_an_allowed_route_or_refused(tail: bytes, method: str) -> None:
    got = v1_route(b"/v1/" + tail, method)
    if isinstance(got, Refused):
        assert got.status in (404, 405) and got.detail
    else:
        assert got in V1_ROUTES and tail.decode() == got and method in V1_ROUTES[got]
