"""Warnings for the caller to show, and URLs safe to put in them."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("corral.store")

MAX_WARNINGS = 200  # callers take them; this only bounds a caller that never does


class Warnings:
    """What a store noticed (entries dropped, Redis gone) for its caller to show: each message
    once, the newest `limit` kept, and delivered by `take()` to the one consumer that asks."""

    def __init__(self, limit: int = MAX_WARNINGS) -> None:
        self._items: list[str] = []
        self._limit = limit

    def add(self, message: str) -> None:
        log.debug("%s", message)
        if message in self._items:
            return
        self._items.append(message)
        del self._items[: -self._limit]

    def take(self) -> list[str]:
        taken, self._items = self._items, []
        return taken

    def peek(self) -> list[str]:
        """A copy, for diagnostics and tests; nothing is delivered."""
        return list(self._items)


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable redis URL>"
