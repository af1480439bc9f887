"""The dashboard's guards: where it may listen, who may act, and how much they may send.

Reads are open (they show what the store says); every request that could change something (any
method but GET/HEAD), every request to `/v1` (GET included: each one reaches the model) and the
coordinator's log (`/api/logs`: it can hold prompts) need `Authorization: Bearer <token>`,
checked before its body is read. Every body, on every route and method, is read in the chunks
the server hands over and refused (413) past the route's cap, so none is ever held whole beyond
it. The Host header is read as a URL authority would be (one
header, no userinfo, brackets closed right before the port, a port of digits); a request that
reached a loopback address must also be addressed to a loopback name or one of the machine's
own, so a web page cannot read the dashboard (or prompt the coordinator) through DNS rebinding.
Node registrations are bounded too (`NodeAdmission`): a cap on live nodes and a token bucket per
client address for new ones.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import math
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every route but /v1: registrations and small commands (a heartbeat is ~300 bytes, 64 devices
# ~5 KiB). GET routes take no body; one sent anyway is held to this too.
DEFAULT_MAX_BODY = 64 * 1024
# /v1/*: llama-server requests. A 128k-token context is ~0.5 MB of text (~1 MB JSON-escaped); a
# base64 image ~1-3 MB. 8 MiB holds the longest context several times over, or a few images;
# past that a request is more likely abuse than use, and the guard holds up to this much per
# request in memory before it forwards it.
DEFAULT_MAX_PROXY_BODY = 8 * 1024 * 1024
# A refused body up to this size is read and dropped before the answer, so the client reads a
# 413/401 rather than a connection reset (closing a socket with unread data sends RST). Larger
# ones are answered at once and the connection closed: the client may see a reset then.
DRAIN_LIMIT = 16 * 1024 * 1024

DEFAULT_MAX_NODES = 1024  # live node registrations through the API (`--max-nodes`)
DEFAULT_REGISTRATION_RATE = 10.0  # new registrations a second per client address ...
DEFAULT_REGISTRATION_BURST = 20.0  # ... and at once after a quiet spell

SAFE_METHODS = frozenset({"GET", "HEAD"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# (client address, node id) -> the refusal a new registration would get now, or None.
Precheck = Callable[[str, str], "Refusal | None"]


class InsecureBindError(ValueError):
    """Refusal to listen beyond loopback without a token."""


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; False for everything else (0.0.0.0 included)."""
    text = host.strip().strip("[]").lower()
    if text in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, insecure: bool = False) -> None:
    """Pure: refuse to serve a non-loopback address without a token, unless told `insecure`."""
    if is_loopback_host(host) or token or insecure:
        return
    raise InsecureBindError(
        f"refusing to listen on {host}: the dashboard can restart the coordinator and register"
        " nodes, so anything but loopback needs a token. Set CORRAL_TOKEN (a long random"
        " string), bind 127.0.0.1, or pass --insecure to accept the risk."
    )


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization` header against `Bearer <token>`."""
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


_REG_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_PORT = re.compile(r"[0-9]{0,5}")


def parse_host(host_header: str) -> tuple[str, int | None]:
    """Pure: (name, port) of a Host header, read as a URL authority (RFC 3986 3.2) would be.

    `localhost:8080` → ("localhost", 8080); `[::1]` → ("::1", None). Raises Refusal(400) for
    anything else: userinfo (`127.0.0.1:80@evil`), a bracket not closed right before the port or
    the end (`[::1]evil`), a bare IPv6 address, a port that is not 0-65535 in ASCII digits, or a
    name outside letters, digits, `-`, `_` and dots. Whatever a browser or client library sends
    passes; what one parser would read as another host than the next does not.
    """

    def bad(why: str) -> Refusal:
        return Refusal(400, f"Host header {host_header[:100]!r} is not a host[:port]: {why}")

    text = host_header.strip(" \t")
    if not text:
        raise bad("it is empty")
    if not text.isascii() or not text.isprintable():
        raise bad("only printable ASCII is allowed")
    if "@" in text:
        raise bad("userinfo ('@') is not allowed")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad("'[' is never closed")
        name, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise bad("']' must be followed by ':port' or nothing")
        port_text = rest[1:] if rest else None
        try:
            if "%" in name:  # a zone: only meaningful on this machine, and never in Host
                raise ValueError(name)
            ipaddress.IPv6Address(name)
        except ValueError:
            raise bad("inside brackets must be an IPv6 address (no zone)") from None
    else:
        if "[" in text or "]" in text:
            raise bad("a bracket belongs only around an IPv6 address")
        name, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
        if port_text is not None and ":" in port_text:
            raise bad("more than one ':' (an IPv6 address goes in brackets)")
        if not _REG_NAME.fullmatch(name):
            raise bad("the name may hold only letters, digits, '-', '_' and dots")
    if port_text is None or port_text == "":
        return name, None
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise bad("the port must be 0-65535 in digits")
    return name, int(port_text)


def host_name(host_header: str) -> str:
    """Pure: the name in a Host header (`[::1]:8080` → `::1`, `localhost:8080` → `localhost`);
    raises Refusal(400) for one that is not a host[:port] (parse_host)."""
    return parse_host(host_header)[0]


def machine_names(hosts_text: str, hostname: str) -> frozenset[str]:
    """Pure: the names this machine's owner gave its loopback addresses: the host name (Debian
    maps it to 127.0.1.1) and every /etc/hosts name on a loopback line. A user opening the
    dashboard by one of these is at this machine; a rebinding page cannot pick them."""
    names = {hostname.lower()} if hostname else set()
    for line in hosts_text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and is_loopback_host(fields[0]):
            names.update(name.lower() for name in fields[1:])
    return frozenset(names)


def read_machine_names(hosts_file: Path = Path("/etc/hosts")) -> frozenset[str]:
    """machine_names() of this machine (reads one small file, once, when the app is built)."""
    try:
        text = hosts_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return machine_names(text, socket.gethostname())


def check_host(
    local_address: str | None, host_header: str | None, allowed: frozenset[str] = frozenset()
) -> None:
    """Pure: refuse (421) a request that came in on loopback but names another host.

    A browser page from elsewhere can make its own name resolve to 127.0.0.1 (DNS rebinding) and
    then read a loopback service as if it were its own origin; its requests still carry its
    name in Host, which no real user of a loopback dashboard sends. Loopback names and the
    machine's own (`allowed`, from machine_names) pass; so do requests that reached a LAN
    address, and those without a Host header. A Host that is not a host[:port] at all is
    refused (400) wherever it arrived: parse_host.
    """
    if host_header is None:
        return
    name = host_name(host_header)
    if local_address is None or not is_loopback_host(local_address):
        return
    if is_loopback_host(name) or name.lower().rstrip(".") in allowed:
        return
    raise Refusal(
        421,
        f"this dashboard answers on loopback only to loopback names (localhost, 127.0.0.1,"
        f" [::1]) and this machine's own, not to Host {name!r}: a page from another site may"
        " be trying DNS rebinding. Open it as http://127.0.0.1:<port>/",
    )


def _host_refusal(
    allowed: frozenset[str], local_address: str | None, host_header: bytes | None
) -> Refusal | None:
    try:
        header = None if host_header is None else host_header.decode("latin-1")
        check_host(local_address, header, allowed)
    except Refusal as refusal:
        return refusal
    return None


def two_hosts(count: int) -> Refusal:
    """The refusal of a request with `count` (> 1) Host headers."""
    return Refusal(
        400,
        f"{count} Host headers: a request names one host; with two, one reader may check one"
        " name while another acts on the other (RFC 9112 section 3.2 says 400)",
    )


@dataclass(frozen=True, slots=True)
class GuardConfig:
    token: str | None
    max_body: int = DEFAULT_MAX_BODY
    max_proxy_body: int = DEFAULT_MAX_PROXY_BODY
    proxy_prefix: str = "/v1/"
    json_prefix: str = "/api/"
    machine_names: frozenset[str] = frozenset()  # accepted on loopback besides loopback names
    drain_limit: int = DRAIN_LIMIT
    registration_path: str = "/api/nodes/heartbeat"
    # Reads that need the token too: the coordinator's log can hold prompts.
    guarded_reads: frozenset[str] = frozenset({"/api/logs"})

    def is_proxied(self, path: str) -> bool:
        """`/v1` and everything under it: forwarded to the model, so always token-guarded."""
        return path.startswith(self.proxy_prefix) or path == self.proxy_prefix.rstrip("/")

    def needs_token(self, method: str, path: str | None) -> bool:
        """Every method but GET/HEAD; and those too on `/v1` and on the guarded reads."""
        if method.upper() not in SAFE_METHODS:
            return True
        return path is not None and (self.is_proxied(path) or path in self.guarded_reads)


class Refusal(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def authorize(
    cfg: GuardConfig, method: str, authorization: str | None, path: str | None = None
) -> None:
    """Pure: raise Refusal(401) unless this request may go on. GET/HEAD are open, except on
    `/v1` (`path`), where every request reaches the model, and on `cfg.guarded_reads`."""
    if not cfg.needs_token(method, path):
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="corral"'}
    if not cfg.token:
        raise Refusal(
            401,
            "this dashboard was started without a token, so it is read-only and /v1 is closed:"
            " set CORRAL_TOKEN to allow actions",
            challenge,
        )
    if authorization is None:
        raise Refusal(401, "missing 'Authorization: Bearer <token>' header", challenge)
    if authorization.partition(" ")[0].lower() != "bearer":
        raise Refusal(401, "the Authorization header must be 'Bearer <token>'", challenge)
    if not token_matches(authorization, cfg.token):
        raise Refusal(401, "wrong token", challenge)


def declared_length(values: list[str]) -> int | None:
    """Pure: the body length the Content-Length headers declare (None: no header); Refusal(400)
    for one that is not digits, or several that disagree."""
    if not values:
        return None
    lengths = set()
    for value in values:
        for item in value.split(","):
            text = item.strip()
            if not text.isascii() or not text.isdigit() or len(text) > 18:
                raise Refusal(400, f"Content-Length {value[:40]!r} is not a number")
            lengths.add(int(text))
    if len(lengths) > 1:
        raise Refusal(400, "Content-Length headers disagree")
    return lengths.pop()


async def _send_json(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _Body:
    """The request body as the server hands it over: one chunk at a time, never more."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.done = False  # the last chunk (or the client's departure) has been received
        self.asked = False  # asked for (the server then sends `100 Continue` if expected)
        self.read = 0

    async def chunk(self) -> bytes:
        self.asked = True
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.done = True
            raise Refusal(400, "client went away before sending its body")
        data: bytes = message.get("body", b"")
        self.read += len(data)
        if not message.get("more_body", False):
            self.done = True
        return data

    async def read_all(self, limit: int) -> bytes:
        """The whole body, or Refusal(413) as soon as it passes `limit` bytes."""
        chunks: list[bytes] = []
        while not self.done:
            data = await self.chunk()
            if self.read > limit:
                raise too_large(limit)
            chunks.append(data)
        return b"".join(chunks)

    async def drain(self, budget: int) -> None:
        """Read and drop what is left, up to `budget` bytes read in all."""
        while not self.done and self.read <= budget:
            try:
                await self.chunk()
            except Refusal:
                return


def too_large(limit: int) -> Refusal:
    size = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit / 2**10:g} KiB"
    return Refusal(
        413, f"request body larger than {limit} bytes ({size}), the most this route takes"
    )


class GuardMiddleware:
    """Pure ASGI: Host, token, then the body read bounded and replayed to the app.

    Reading the body here means an oversized or unauthorised request never reaches a handler,
    whatever the handler does with its body, and a refused request changes nothing. A request
    that declares no body (no Content-Length above 0, no Transfer-Encoding) goes straight on.
    """

    def __init__(self, app: ASGIApp, cfg: GuardConfig, precheck: Precheck | None = None) -> None:
        self.app = app
        self.cfg = cfg
        self.precheck = precheck
        # The same few (address, Host) pairs arrive on every request: decide each once.
        self._host_refusal = functools.lru_cache(maxsize=256)(
            functools.partial(_host_refusal, cfg.machine_names)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts: list[bytes] = []
        lengths: list[str] = []
        chunked = False
        authorization = content_type = None
        expect_continue = False
        for key, value in scope["headers"]:  # ASGI: names in lowercase
            if key == b"host":
                hosts.append(value)
            elif key == b"content-length":
                lengths.append(value.decode("latin-1"))
            elif key == b"transfer-encoding":
                chunked = True
            elif key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"content-type":
                content_type = value.decode("latin-1")
            elif key == b"expect":
                expect_continue = value.strip().lower() == b"100-continue"
        body = _Body(receive)
        try:
            length = declared_length(lengths)
        except Refusal as bad_length:  # the body's end is unknown: nothing to drain
            await _send_json(send, bad_length.status, bad_length.detail, bad_length.headers)
            return
        has_body = chunked or bool(length)
        server = scope.get("server")
        misdirected = (
            two_hosts(len(hosts))
            if len(hosts) > 1
            else self._host_refusal(server[0] if server else None, hosts[0] if hosts else None)
        )
        if misdirected is not None:
            await self._refuse(misdirected, body, has_body, length, expect_continue, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        proxied = self.cfg.is_proxied(path)
        if not has_body and not self.cfg.needs_token(method, path):  # the hot path: reads
            await self.app(scope, receive, send)
            return
        limit = self.cfg.max_proxy_body if proxied else self.cfg.max_body
        try:
            authorize(self.cfg, method, authorization, path)
            if not has_body:
                await self.app(scope, receive, send)
                return
            if length is not None and length > limit:
                raise too_large(limit)
            data = await body.read_all(limit)
            if data and method not in SAFE_METHODS and path.startswith(self.cfg.json_prefix):
                check_json_type(content_type)
                value = check_json_body(data)
                if path == self.cfg.registration_path and self.precheck is not None:
                    self._registration(scope, value)
        except Refusal as refusal:
            await self._refuse(refusal, body, has_body, length, expect_continue, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _registration(self, scope: Scope, value: Any) -> None:
        """A registration over its client's rate, or past the cap, is refused here, before
        FastAPI validates it: a flood costs a JSON parse a request, not a full validation."""
        node_id = value.get("node_id") if isinstance(value, dict) else None
        client = scope.get("client")
        if self.precheck is None or not isinstance(node_id, str) or not client:
            return
        refused = self.precheck(str(client[0]), node_id)
        if refused is not None:
            raise refused

    async def _refuse(
        self,
        refusal: Refusal,
        body: _Body,
        has_body: bool,
        length: int | None,
        expect_continue: bool,
        send: Send,
    ) -> None:
        """Answer `refusal` and close. A body still coming is read and dropped first (up to the
        drain limit) so the client gets the answer, not a reset; one held back behind
        `Expect: 100-continue` is never asked for."""
        budget = self.cfg.drain_limit
        waiting = expect_continue and not body.asked
        fits = length is None or length <= budget
        if has_body and not body.done and not waiting and fits:
            await body.drain(budget)
        await _send_json(send, refusal.status, refusal.detail, refusal.headers)


def check_json_type(content_type: str | None) -> None:
    """Pure: a body sent to /api/* must say it is JSON (also keeps cross-site form posts out)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise Refusal(415, f"send JSON with 'Content-Type: application/json', not {media!r}")


def _no_constant(name: str) -> Any:
    raise Refusal(
        422,
        f"body holds {name}, which is not JSON (RFC 8259 has no NaN or Infinity):"
        " send a finite number, or null",
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Refusal(
            422, f"body holds the number {text[:40]}, beyond what a double holds: send less"
        )
    return value


def check_json_body(body: bytes) -> Any:
    """Pure: the JSON value of `body`; Refusal for one that is not UTF-8 JSON, saying where it
    breaks, and 422 for NaN, Infinity or a number past a double's range (Python would read
    them; JSON has none)."""
    try:
        return json.loads(
            body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError as exc:
        raise Refusal(400, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise Refusal(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise Refusal(400, "body is not valid JSON: nested too deeply") from None


# ---- node registrations ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float = DEFAULT_REGISTRATION_RATE  # tokens a second
    burst: float = DEFAULT_REGISTRATION_BURST  # the bucket's size

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise ValueError(f"rate limit {self.rate:g}/s, burst {self.burst:g}: need > 0 and >= 1")


_EPSILON = 1e-6


class TokenBuckets:
    """Pure: one token bucket per key (a client address); the time is always passed in.

    At most `max_keys` buckets are kept: past that, the ones that have refilled (idle long
    enough to be full again) go first, then the least recently used.
    """

    def __init__(self, limit: RateLimit, max_keys: int = 4096) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` has a token (0.0: it has one now); takes nothing."""
        tokens, at = self._buckets.get(key, (self.limit.burst, now))
        tokens = min(self.limit.burst, tokens + max(0.0, now - at) * self.limit.rate)
        return 0.0 if tokens >= 1 - _EPSILON else (1 - tokens) / self.limit.rate

    def take(self, key: str, now: float) -> float:
        """Take one token for `key`: 0.0 when taken, else the seconds until one is there."""
        rate, burst = self.limit.rate, self.limit.burst
        tokens, at = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - at) * rate)
        wait = 0.0
        if tokens >= 1 - _EPSILON:  # wall-clock seconds near 1.7e9 carry ~1e-7 of rounding
            tokens = max(0.0, tokens - 1)
        else:
            wait = (1 - tokens) / rate
        self._buckets[key] = (tokens, now)  # last: the most recently used
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return wait

    def _prune(self, now: float) -> None:
        rate, burst = self.limit.rate, self.limit.burst
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * rate >= burst]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


class NodeAdmission:
    """Pure: which node heartbeats the API takes; the time is always passed in.

    A heartbeat from a live node (same id, same endpoint, within its TTL) is always taken and
    costs nothing. Anything else is a new registration: refused (429, Retry-After) when
    `max_nodes` other nodes are live, or when its client address has used up its token bucket;
    refusing one consumes nothing. The table holds at most `max_nodes` entries.
    """

    def __init__(self, max_nodes: int = DEFAULT_MAX_NODES, limit: RateLimit | None = None) -> None:
        if max_nodes < 1:
            raise ValueError(f"--max-nodes {max_nodes}: at least 1")
        self.max_nodes = max_nodes
        self.limit = limit or RateLimit()
        self.buckets = TokenBuckets(self.limit)
        self._nodes: dict[str, tuple[str, float]] = {}  # node_id -> (endpoint, expires at)

    def seed(self, nodes: Iterable[tuple[str, str, float]]) -> None:
        """Nodes already live in the store (node_id, endpoint, expires at): heartbeats of theirs
        are not new registrations. Up to the cap."""
        for node_id, endpoint, expires_at in nodes:
            if len(self._nodes) >= self.max_nodes:
                return
            self._nodes[node_id] = (endpoint, expires_at)

    def live(self, now: float) -> int:
        return sum(1 for _, expires in self._nodes.values() if expires > now)

    def admit(
        self, client: str, node_id: str, endpoint: str, ttl_s: float, now: float
    ) -> Refusal | None:
        """None, with the node noted live for `ttl_s` from `now`; or why not (429)."""
        known = self._nodes.get(node_id)
        if known is not None and known[0] == endpoint and known[1] > now:
            self._nodes[node_id] = (endpoint, now + ttl_s)
            return None
        refused = self._refusal(client, node_id, now, take=True)
        if refused is None:
            self._nodes[node_id] = (endpoint, now + ttl_s)
        return refused

    def precheck(self, client: str, node_id: str, now: float) -> Refusal | None:
        """The refusal `admit` would give a new registration of `node_id` from `client` now,
        taking nothing; None for a live node id (its endpoint is checked by `admit`). Lets the
        guard turn a flood away before any validation runs."""
        known = self._nodes.get(node_id)
        if known is not None and known[1] > now:
            return None
        return self._refusal(client, node_id, now, take=False)

    def _refusal(self, client: str, node_id: str, now: float, take: bool) -> Refusal | None:
        others = len(self._nodes) - (node_id in self._nodes)
        if others >= self.max_nodes:
            self._expire(now)
            others = len(self._nodes) - (node_id in self._nodes)
        if others >= self.max_nodes:
            wait = min(expires for _, expires in self._nodes.values()) - now
            return Refusal(
                429,
                f"{others} nodes are registered, the most this dashboard takes (--max-nodes"
                f" {self.max_nodes}); a place frees when one stops sending heartbeats",
                {"Retry-After": _retry_after(wait)},
            )
        wait = self.buckets.take(client, now) if take else self.buckets.wait(client, now)
        if wait > 0:
            return Refusal(
                429,
                f"too many new node registrations from {client}: at most"
                f" {self.limit.rate:g} a second, {self.limit.burst:g} at once; heartbeats of"
                " registered nodes are not counted",
                {"Retry-After": _retry_after(wait)},
            )
        return None

    def forget(self, node_id: str) -> None:
        """Undo an admission whose registration could not be stored."""
        self._nodes.pop(node_id, None)

    def _expire(self, now: float) -> None:
        for node_id in [n for n, (_, expires) in self._nodes.items() if expires <= now]:
            del self._nodes[node_id]


def _retry_after(seconds: float) -> str:
    """Retry-After in whole seconds (RFC 9110: delay-seconds), at least 1."""
    return str(max(1, math.ceil(seconds)))
