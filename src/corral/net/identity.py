"""Which endpoints are one backend: the address each name reaches, as llama-server would reach it.

A ggml-rpc-server serves one client at a time. llama-server given `127.0.0.1:P` and
`localhost:P` opens two connections to the one server and hangs until it dies, so every name is
resolved to the address it reaches before endpoints are merged or used. llama-server's RPC client
resolves a name with gethostbyname (IPv4 only) and connects to the first address; so does this.
An IP endpoint is its own identity (the endpoint gate already turned IPv4-mapped IPv6 forms into
IPv4). A name that does not resolve in time stays its own identity: nothing is merged on a guess.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Mapping, Sequence

from corral.endpoint import Endpoint

RESOLVE_TIMEOUT_S = 2.0
MAX_RESOLVING = 16  # names resolved at once: each takes a thread of the default executor


async def identities(
    endpoints: Iterable[Endpoint], timeout_s: float = RESOLVE_TIMEOUT_S
) -> dict[Endpoint, Endpoint]:
    """Each endpoint -> the endpoint of the address it reaches (itself for an IP endpoint)."""
    wanted = list(dict.fromkeys(endpoints))
    names = sorted({ep.host for ep in wanted if not ep.is_ip})
    gate = asyncio.Semaphore(MAX_RESOLVING)

    async def first_address(name: str) -> str | None:
        async with gate:
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(
                        name, None, family=socket.AF_INET, type=socket.SOCK_STREAM
                    ),
                    timeout_s,
                )
            except (OSError, TimeoutError, UnicodeError):
                return None
        return str(infos[0][4][0]) if infos else None

    found = await asyncio.gather(*(first_address(n) for n in names))
    address = {n: a for n, a in zip(names, found, strict=True) if a is not None}
    return {ep: Endpoint(address[ep.host], ep.port) if ep.host in address else ep for ep in wanted}


def one_per_backend(
    endpoints: Sequence[Endpoint], identity: Mapping[Endpoint, Endpoint]
) -> list[Endpoint]:
    """Pure: the endpoints in order, dropping any that names a backend named before it."""
    seen: set[Endpoint] = set()
    kept: list[Endpoint] = []
    for ep in endpoints:
        key = identity.get(ep, ep)
        if key not in seen:
            seen.add(key)
            kept.append(ep)
    return kept
