"""Warnings for the caller to show, and URLs safe to put in them."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("corral.store")

MAX_WARNINGS = 200  # callers drain the list; this only bounds a caller that never does


def add_warning(warnings: list[str], message: str) -> None:
    log.debug("%s", message)
    if message in warnings:
        return
    warnings.append(message)
    del warnings[:-MAX_WARNINGS]


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
