"""The dashboard's guards: where it may listen, who may act, and how much they may send.

Reads are open (they show what the store says); every request that could change something (any
method but GET/HEAD) needs `Authorization: Bearer <token>`, checked before its body is read.
A request that reached a loopback address must also be addressed to a loopback name or one of
the machine's own, so a web page cannot read the dashboard (or prompt the coordinator) through
DNS rebinding.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MAX_BODY = 64 * 1024  # /api/*: registrations and small commands
DEFAULT_MAX_PROXY_BODY = 16 * 1024 * 1024  # /v1/*: chat requests with long contexts

SAFE_METHODS = frozenset({"GET", "HEAD"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


def host_name(host_header: str) -> str:
    """Pure: the name in a Host header (`[::1]:8080` → `::1`, `localhost:8080` → `localhost`)."""
    text = host_header.strip()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        return text.partition(":")[0]
    return text


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
    address, and those without a Host header.
    """
    if local_address is None or host_header is None or not is_loopback_host(local_address):
        return
    name = host_name(host_header)
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


@dataclass(frozen=True, slots=True)
class GuardConfig:
    token: str | None
    max_body: int = DEFAULT_MAX_BODY
    max_proxy_body: int = DEFAULT_MAX_PROXY_BODY
    proxy_prefix: str = "/v1/"
    json_prefix: str = "/api/"
    machine_names: frozenset[str] = frozenset()  # accepted on loopback besides loopback names


class Refusal(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def authorize(cfg: GuardConfig, method: str, authorization: str | None) -> None:
    """Pure: raise Refusal(401) unless this request may act."""
    if method.upper() in SAFE_METHODS:
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="corral"'}
    if not cfg.token:
        raise Refusal(
            401,
            "this dashboard was started without a token, so it is read-only:"
            " set CORRAL_TOKEN to allow actions",
            challenge,
        )
    if authorization is None:
        raise Refusal(401, "missing 'Authorization: Bearer <token>' header", challenge)
    if authorization.partition(" ")[0].lower() != "bearer":
        raise Refusal(401, "the Authorization header must be 'Bearer <token>'", challenge)
    if not token_matches(authorization, cfg.token):
        raise Refusal(401, "wrong token", challenge)


async def _send_json(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Pure ASGI: token check, then the body read whole (bounded) and replayed to the app.

    Reading the body here means an oversized or unauthorised request never reaches a handler,
    whatever the handler does with its body, and a refused request changes nothing.
    """

    def __init__(self, app: ASGIApp, cfg: GuardConfig) -> None:
        self.app = app
        self.cfg = cfg
        # The same few (address, Host) pairs arrive on every request: decide each once.
        self._host_refusal = functools.lru_cache(maxsize=256)(
            functools.partial(_host_refusal, cfg.machine_names)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = scope.get("server")
        host = next((v for k, v in scope["headers"] if k == b"host"), None)  # ASGI: lowercase
        misdirected = self._host_refusal(server[0] if server else None, host)
        if misdirected is not None:
            await _send_json(send, misdirected.status, misdirected.detail, misdirected.headers)
            return
        if scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        limit = (
            self.cfg.max_proxy_body if path.startswith(self.cfg.proxy_prefix) else self.cfg.max_body
        )
        try:
            authorize(self.cfg, scope["method"], headers.get("authorization"))
            body = await _read_body(receive, headers.get("content-length"), limit)
            if body and path.startswith(self.cfg.json_prefix):
                check_json_type(headers.get("content-type"))
                check_json_body(body)
        except Refusal as refusal:
            await _send_json(send, refusal.status, refusal.detail, refusal.headers)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def check_json_type(content_type: str | None) -> None:
    """Pure: a body sent to /api/* must say it is JSON (also keeps cross-site form posts out)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise Refusal(415, f"send JSON with 'Content-Type: application/json', not {media!r}")


def check_json_body(body: bytes) -> None:
    """Pure: refuse a body that is not UTF-8 JSON, saying where it breaks."""
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Refusal(400, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise Refusal(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise Refusal(400, "body is not valid JSON: nested too deeply") from None


async def _read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    too_big = Refusal(413, f"request body larger than {limit} bytes")
    if content_length is not None:
        if not content_length.isdigit():
            raise Refusal(400, "Content-Length is not a number")
        if int(content_length) > limit:
            raise too_big
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refusal(400, "client went away before sending its body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
