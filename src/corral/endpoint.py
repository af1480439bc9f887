"""One typed value for `host:port`, and the single gate every source goes through.

Every endpoint Corral handles — from a command line, a file, Redis, mDNS, a scan — is parsed
here. Anything that is not a real, connectable backend address is refused with a message that
says what was wrong; the caller adds *where* (file:line, key, process) via `where=`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DEFAULT_RPC_PORT = 50052

# Names older setups used as "no backend here" markers; they must never reach a coordinator.
PLACEHOLDER_HOSTS = frozenset(
    {
        "coordinator",
        "placeholder",
        "none",
        "null",
        "nil",
        "undefined",
        "unknown",
        "changeme",
        "host",
        "hostname",
        "your-host",
        "example",
        "todo",
    }
)

_MAX_HOST_LEN = 253
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class EndpointError(ValueError):
    """An input that is not a usable `host:port`; the message says what and where."""


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:  # IPv6 literal
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def _fail(reason: str, text: str, where: str | None) -> EndpointError:
    prefix = f"{where}: " if where else ""
    return EndpointError(f"{prefix}{reason}: {text!r}")


def _validate_port(raw: str, text: str, where: str | None) -> int:
    if not raw:
        raise _fail("missing port", text, where)
    if not raw.isascii() or not raw.isdigit():
        raise _fail("port is not a number", text, where)
    if len(raw) > 5:
        raise _fail("port out of range 1-65535", text, where)
    port = int(raw)
    if port == 0:
        raise _fail("port 0 is a placeholder, not a listening port", text, where)
    if port > 65535:
        raise _fail("port out of range 1-65535", text, where)
    return port


def validate_host(host: str, text: str, where: str | None = None) -> str:
    """Return the canonical form of `host`, or raise EndpointError.

    An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is its IPv4 address, checked by the IPv4 rules.
    """
    if not host:
        raise _fail("empty host", text, where)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise _fail(
                "an IPv6 zone id names a link, not a backend llama-server can reach", text, where
            )
        if addr.ipv4_mapped is not None:
            # One address, two spellings: the IPv4 form is the one every rule and every tool
            # (llama-server's --rpc included) reads, so that is the one kept.
            addr = addr.ipv4_mapped
    if addr is not None:
        if addr.is_unspecified:
            raise _fail("unspecified address is a placeholder, not a backend", text, where)
        if addr.is_multicast:
            raise _fail("multicast address cannot be a backend", text, where)
        if addr == ipaddress.IPv4Address("255.255.255.255"):
            raise _fail("broadcast address cannot be a backend", text, where)
        return addr.compressed
    name = host.rstrip(".").lower()
    if len(name) > _MAX_HOST_LEN or not name:
        raise _fail("host name too long or empty", text, where)
    if not name.isascii() or not all(_LABEL.match(label) for label in name.split(".")):
        raise _fail("host is not a valid host name or IP address", text, where)
    if name.split(".")[-1].isdigit():
        # "300.1.2.3" or "1.2.3" look like addresses but are not valid ones.
        raise _fail("host looks like an IP address but is not a valid one", text, where)
    if name in PLACEHOLDER_HOSTS:
        raise _fail("placeholder host, not a backend", text, where)
    return name


def _looks_like_ipv6(text: str) -> bool:
    """`::1` or `::1:50052` (an address, perhaps with a port glued on): it wanted brackets."""
    for candidate in (text, text.rsplit(":", 1)[0]):
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        return True
    return False


def parse_endpoint(
    text: str, *, default_port: int | None = None, where: str | None = None
) -> Endpoint:
    """Parse `host:port`, `[v6]:port`, or (with default_port) a bare host.

    Leading/trailing whitespace is not forgiven inside the value: callers strip lines themselves,
    so a stray space inside a value is reported rather than silently fixed.
    """
    if not isinstance(text, str):
        raise _fail("endpoint must be a string", repr(text), where)
    if text == "" or text.strip() == "":
        raise _fail("empty endpoint", text, where)
    if any(ch.isspace() for ch in text):
        raise _fail("whitespace inside endpoint", text, where)
    if len(text) > _MAX_HOST_LEN + 10:
        raise _fail("endpoint too long", text[:40] + "...", where)

    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _fail("unclosed '[' in IPv6 endpoint", text, where)
        host = text[1:close]
        rest = text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail("not an IPv6 address inside brackets", text, where) from None
        if rest == "" and default_port is not None:
            return Endpoint(validate_host(host, text, where), default_port)
        if not rest.startswith(":"):
            raise _fail("expected ':port' after ']'", text, where)
        return Endpoint(validate_host(host, text, where), _validate_port(rest[1:], text, where))

    if text.count(":") > 1:
        if _looks_like_ipv6(text):
            raise _fail("IPv6 addresses need brackets, as in [::1]:50052", text, where)
        raise _fail("more than one ':' (expected host:port)", text, where)
    if ":" in text:
        host, raw_port = text.split(":", 1)
        return Endpoint(validate_host(host, text, where), _validate_port(raw_port, text, where))
    if default_port is None:
        raise _fail("missing ':port'", text, where)
    return Endpoint(validate_host(text, text, where), default_port)


def parse_endpoint_list(
    text: str, *, where: str | None = None, default_port: int | None = None
) -> tuple[list[Endpoint], list[str]]:
    """Parse a comma-separated list (llama-server's --rpc form).

    Returns the good endpoints and one error message per bad item, so that one bad item does not
    hide the good ones.
    """
    good: list[Endpoint] = []
    errors: list[str] = []
    for i, item in enumerate(text.split(",")):
        item_where = f"{where} item {i + 1}" if where else f"item {i + 1}"
        try:
            good.append(parse_endpoint(item.strip(), where=item_where, default_port=default_port))
        except EndpointError as exc:
            errors.append(str(exc))
    return good, errors
