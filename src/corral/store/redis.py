"""RedisStore: state shared by several machines; every key under one prefix, every key with a TTL.

Layout under `corral:`: `node:<id>` (string; expires after three missed heartbeats, so a silent
node disappears on its own), `backends` (hash endpoint -> record), `coordinator` (string),
`events` (list capped with LTRIM). Changes are published on `corral:changes`. Everything read
back goes through the codec; bad entries are dropped with a warning naming the key.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from corral.endpoint import Endpoint
from corral.store import codec
from corral.store.base import (
    MAX_EVENTS,
    BackendRecord,
    Change,
    CoordinatorRecord,
    Event,
    NodeRegistration,
)
from corral.store.warn import Warnings, redact_url

PREFIX = "corral:"
RETENTION_S = 30 * 86400  # the last known view outlives a month of silence, not forever
LEGACY_KEY = "sollol:router:metadata"  # where the older design kept its backend list


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = PREFIX,
        timeout_s: float = 1.0,
        max_events: int = MAX_EVENTS,
        retention_s: int = RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = redact_url(url)
        self.prefix = prefix
        self.max_events = max_events
        self.retention_s = retention_s
        self._warnings = Warnings()
        self.origin = uuid.uuid4().hex  # lets a subscriber skip its own changes
        self._clock = clock  # wall-clock time: TTLs, staleness; tests pass their own
        self.opened_at = clock()
        self.channel = f"{prefix}changes"
        # No retries inside the client: a down server must show at once, not after backoff.
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._subs: set[RedisSubscription] = set()

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _warn(self, message: str) -> None:
        self._warnings.add(message)

    @property
    def warnings(self) -> list[str]:
        """The warnings not yet taken (a copy)."""
        return self._warnings.peek()

    def take_warnings(self) -> list[str]:
        return self._warnings.take()

    def shared_reachable(self) -> bool | None:
        return None  # alone it does not track reachability; ResilientStore does

    def _where(self, key: str, field: str | None = None) -> str:
        inner = "" if field is None else f" field {codec.show(field)}"
        return f"redis {self.url} key {key}{inner}"

    async def _claim(self, key: str, kind: str) -> None:
        """Our key holding another type (planted or corrupted) is replaced, not fatal."""
        found = _text(await self._client.type(key))
        if found not in ("none", kind):
            self._warn(f"{self._where(key)}: holds a {found}, not a {kind}; replaced")
            await self._client.delete(key)

    async def ping(self) -> None:
        await self._client.ping()

    def _publish(self, pipe: Pipeline, change: Change) -> None:
        pipe.publish(self.channel, codec.dumps(codec.change_to_json(change, self.origin), "change"))

    # --- nodes --------------------------------------------------------------------------------

    async def register_node(self, reg: NodeRegistration) -> None:
        body = codec.dumps(codec.node_to_json(reg), f"node {reg.node_id!r}")
        key = self._key(f"node:{reg.node_id}")
        now = self._clock()
        # A clock ahead of ours must not keep a registration alive longer than its TTL.
        ttl_ms = int((min(reg.last_heartbeat, now) + reg.ttl_s - now) * 1000)
        async with self._client.pipeline(transaction=True) as pipe:
            if ttl_ms > 0:
                pipe.set(key, body, px=ttl_ms)
            else:
                pipe.delete(key)
            self._publish(pipe, Change("nodes"))
            await pipe.execute()

    async def unregister_node(self, node_id: str) -> None:
        codec.check_node_id(node_id, "unregister_node")
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(f"node:{node_id}"))
            self._publish(pipe, Change("nodes"))
            await pipe.execute()

    async def live_nodes(self) -> list[NodeRegistration]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._key("node:")) + "*"
        keys = sorted({_text(k) async for k in self._client.scan_iter(match=pattern, count=200)})
        if not keys:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            values = await pipe.execute(raise_on_error=False)
        out = []
        for key, value in zip(keys, values, strict=True):
            where = self._where(key)
            if value is None:
                continue  # expired between SCAN and GET
            if isinstance(value, Exception):
                self._warn(f"{where}: unreadable ({value}); dropped")
                continue
            try:
                reg = codec.stored_node(value, where, key.removeprefix(self._key("node:")))
            except codec.CodecError as exc:
                self._warn(f"{exc}; dropped")
                continue
            out.append(reg)
        return out

    # --- backends -----------------------------------------------------------------------------

    async def put_backends(self, records: list[BackendRecord]) -> None:
        if not records:
            return
        now = self._clock()
        bodies = {
            codec.endpoint_key(r.endpoint): codec.backend_to_json(r, written_at=now)
            for r in records
        }
        key = self._key("backends")
        await self._claim(key, "hash")
        old_values = await self._client.hmget(key, list(bodies))
        for body, old in zip(bodies.values(), old_values, strict=True):
            if old is not None:
                with contextlib.suppress(codec.CodecError):  # a bad entry is replaced
                    prev = codec.decode(old, key, codec.backend_from_json)
                    body["first_seen"] = min(prev.first_seen, body["first_seen"])
        mapping: dict[FieldT, EncodableT] = {k: codec.dumps(b, k) for k, b in bodies.items()}
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.retention_s)
            self._publish(pipe, Change("backends"))
            await pipe.execute()

    async def remove_backend(self, endpoint: Endpoint) -> None:
        field = codec.endpoint_key(endpoint)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hdel(self._key("backends"), field)
            self._publish(pipe, Change("backends"))
            await pipe.execute()

    async def backends(self) -> list[BackendRecord]:
        key = self._key("backends")
        try:
            entries: dict[bytes | str, bytes | str] = await self._client.hgetall(key)
        except ResponseError as exc:
            self._warn(f"{self._where(key)}: not a hash ({exc}); ignored")
            return []
        out = []
        for raw_field, value in sorted(entries.items()):
            field = _text(raw_field)
            where = self._where(key, field)
            try:
                rec = codec.stored_backend(value, where, field, self.opened_at)
            except codec.CodecError as exc:
                self._warn(f"{exc}; dropped")
                continue
            out.append(rec)
        return out

    # --- coordinator --------------------------------------------------------------------------

    async def set_coordinator(self, record: CoordinatorRecord) -> None:
        body = codec.dumps(codec.coordinator_to_json(record), "coordinator")
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._key("coordinator"), body, ex=self.retention_s)
            self._publish(pipe, Change("coordinator"))
            await pipe.execute()

    async def coordinator(self) -> CoordinatorRecord | None:
        key = self._key("coordinator")
        try:
            value = await self._client.get(key)
        except ResponseError as exc:
            self._warn(f"{self._where(key)}: not a string ({exc}); ignored")
            return None
        if value is None:
            return None
        try:
            return codec.decode(value, self._where(key), codec.coordinator_from_json)
        except codec.CodecError as exc:
            self._warn(f"{exc}; dropped")
            return None

    # --- events -------------------------------------------------------------------------------

    async def add_event(self, event: Event) -> None:
        await self.add_events([event])

    async def add_events(self, events: list[Event]) -> None:
        if not events:
            return
        bodies = [codec.dumps(codec.event_to_json(e), f"event {e.kind}") for e in events]
        key = self._key("events")
        await self._claim(key, "list")
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *bodies)
            pipe.ltrim(key, -self.max_events, -1)
            pipe.expire(key, self.retention_s)
            for event in events:
                self._publish(pipe, Change("events", event))
            await pipe.execute()

    async def events(self, limit: int = 100) -> list[Event]:
        key = self._key("events")
        n = max(0, min(limit, self.max_events))
        if n == 0:
            return []
        try:
            values = await self._client.lrange(key, -n, -1)
        except ResponseError as exc:
            self._warn(f"{self._where(key)}: not a list ({exc}); ignored")
            return []
        out = []
        for i, value in enumerate(values):
            try:
                out.append(
                    codec.decode(
                        value, f"{self._where(key)} item {i - len(values)}", codec.event_from_json
                    )
                )
            except codec.CodecError as exc:
                self._warn(f"{exc}; dropped")
        return out

    # --- the older design ---------------------------------------------------------------------

    async def legacy_backends(self) -> list[Endpoint]:
        """The `rpc_backends` of `sollol:router:metadata`, through the gate; poison dropped."""
        where = self._where(LEGACY_KEY)
        try:
            value = await self._client.get(LEGACY_KEY)
        except ResponseError as exc:
            self._warn(f"{where}: not a string ({exc}); ignored")
            return []
        if value is None:
            return []
        try:
            good, warnings = codec.decode(value, where, codec.legacy_backends_from_json)
        except codec.CodecError as exc:
            self._warn(f"{exc}; ignored")
            return []
        for warning in warnings:
            self._warn(warning)
        return good

    # --- subscriptions and lifetime -----------------------------------------------------------

    async def subscribe(self, *, skip_origin: str | None = None) -> RedisSubscription:
        """Live once returned. `skip_origin`: drop changes published by that store instance."""
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise
        sub = RedisSubscription(self, pubsub, skip_origin)
        self._subs.add(sub)
        return sub

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.aclose()
        await self._client.aclose()


class RedisSubscription:
    def __init__(self, store: RedisStore, pubsub: PubSub, skip_origin: str | None) -> None:
        self._store = store
        self._pubsub = pubsub
        self._skip = skip_origin
        self._closed = False

    def __aiter__(self) -> RedisSubscription:
        return self

    async def __anext__(self) -> Change:
        where = f"redis {self._store.url} channel {self._store.channel}"
        while not self._closed:
            try:
                # A bounded wait, so a closed subscription is noticed.
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            except (RedisError, OSError, RuntimeError):
                if self._closed:
                    break
                raise
            if msg is None or msg.get("type") != "message":
                continue
            try:
                change, origin = codec.decode(msg["data"], where, codec.change_from_json)
            except codec.CodecError as exc:
                self._store._warn(f"{exc}; dropped")
                continue
            if origin != self._skip:
                return change
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._store._subs.discard(self)
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
