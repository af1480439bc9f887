"""Ask a llama-server over HTTP whether it is ready and how many requests it has in flight."""

from __future__ import annotations

from enum import StrEnum

import httpx

from corral.llama.server import Load, parse_load


class Health(StrEnum):
    READY = "ready"  # 200
    LOADING = "loading"  # 503 "Loading model"
    ERROR = "error"  # answered, but not ready and not loading
    DOWN = "down"  # no answer


class NoAnswer(Exception):
    """llama-server did not answer in time."""


class ServerHttp:
    """One client per coordinator. No keep-alive: llama-server gives every open connection a
    thread of its small HTTP pool, and our polling must not take them from real requests."""

    def __init__(self, base_url: str, timeout: float = 1.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,  # loopback: never through a proxy from the environment
        )

    async def health(self) -> Health:
        try:
            reply = await self._client.get("/health")
        except httpx.HTTPError:
            return Health.DOWN
        if reply.status_code == 200:
            return Health.READY
        if reply.status_code == 503 and "loading" in reply.text.lower():
            return Health.LOADING
        return Health.ERROR

    async def load(self) -> Load | None:
        """Requests in flight and work done (/metrics); None if it does not serve /metrics.

        Raises NoAnswer when it does not answer in time: /metrics is answered by llama-server's
        main loop, so silence means that loop is busy in one long step, or stuck.
        """
        try:
            reply = await self._client.get("/metrics")
        except httpx.HTTPError as exc:
            raise NoAnswer(str(exc)) from None
        return parse_load(reply.text) if reply.status_code == 200 else None

    async def in_flight(self) -> int | None:
        """Requests processing or waiting (/metrics, else /slots); None if it cannot tell."""
        try:
            load = await self.load()
        except NoAnswer:
            return 1  # its main loop is busy: something is in flight
        if load is not None:
            return load.in_flight
        try:
            reply = await self._client.get("/slots")
            slots = reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(slots, list):
            return None
        return sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))

    async def aclose(self) -> None:
        await self._client.aclose()
