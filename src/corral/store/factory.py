"""Open the store the configuration asks for: embedded alone, or embedded mirrored to Redis.

The Redis client is imported only when a Redis URL is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from corral.store.base import Store
from corral.store.sqlite import EmbeddedStore
from corral.store.warn import redact_url

DB_NAME = "state.db"
ENV_VARS = ("CORRAL_REDIS_URL", "SOLLOL_REDIS_URL")  # the second is the older design's name
_SCHEMES = ("redis", "rediss", "unix")


def redis_url_from(redis_url: str | None, environ: Mapping[str, str]) -> str | None:
    """--redis wins, then CORRAL_REDIS_URL, then SOLLOL_REDIS_URL; empty means unset."""
    if redis_url:
        return redis_url
    for name in ENV_VARS:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


async def open_store(
    redis_url: str | None,
    state_dir: Path,
    *,
    environ: Mapping[str, str] | None = None,
    retry_s: float | None = None,
) -> Store:
    """`retry_s`: how often a Redis that went away is tried again (None: the store's default)."""
    url = redis_url_from(redis_url, os.environ if environ is None else environ)
    if url is not None and urlsplit(url).scheme not in _SCHEMES:
        raise ValueError(f"redis URL {redact_url(url)!r}: expected redis://, rediss:// or unix://")
    embedded = await EmbeddedStore.open(state_dir / DB_NAME)
    if url is None:
        return embedded
    from corral.store.redis import RedisStore
    from corral.store.resilient import DEFAULT_RETRY_S, ResilientStore

    try:
        redis = RedisStore(url)
    except ValueError as exc:
        await embedded.close()
        raise ValueError(f"redis URL {redact_url(url)!r}: {exc}") from None
    retry = DEFAULT_RETRY_S if retry_s is None else retry_s
    return await ResilientStore.open(embedded, redis, retry_s=retry)
