"""The dashboard app: built by `create_app(store, ...)`, every collaborator passed in.

Every answer comes from the store (through LiveView's in-memory copy, refreshed on the store's
change notifications) or from the collaborators' in-memory state; no request scans or probes.
The routes live in corral.web.routes, one router per concern, and reach all this through the
AppContext on `app.state.corral`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from corral.store.base import Store
from corral.web.control import CoordinatorControl, Rescan
from corral.web.history import DEFAULT_STEP_S, History, observation
from corral.web.live import LiveView
from corral.web.logtail import LogFollowers
from corral.web.metrics import Figures, make_registry
from corral.web.proxy import Forwarder
from corral.web.routes import ROUTERS, AppContext, app_context
from corral.web.routes.assets import load_assets
from corral.web.routes.page import load_page
from corral.web.routes.status import BACKENDS_PATH
from corral.web.security import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_NODES,
    DEFAULT_MAX_PROXY_BODY,
    ASGIApp,
    GuardConfig,
    GuardMiddleware,
    NodeAdmission,
    RateLimit,
    Receive,
    Refusal,
    Scope,
    Send,
    read_machine_names,
)


class CachedBodyMiddleware:
    """Pure ASGI: `GET path` answered with a ready body (LiveView keeps it serialised), without
    going through routing, dependency injection or response validation."""

    def __init__(self, app: ASGIApp, path: str, body: Callable[[], bytes]) -> None:
        self.app = app
        self.path = path
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "GET":
            body = self.body()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the forwarder and LiveView's refresh loop; at shutdown end the event streams and
    cancel whatever the actions left running. Nodes the store already holds live count against
    the cap, and their heartbeats are not new registrations."""
    ctx = app_context(app)
    with contextlib.suppress(Exception):  # an unreadable store: LiveView will say so
        live = await ctx.store.live_nodes()
        ctx.nodes.seed((n.node_id, str(n.endpoint), n.last_heartbeat + n.ttl_s) for n in live)
    await ctx.forwarder.start()
    runner = asyncio.create_task(ctx.live.run())
    await ctx.live.wait_first(5.0)
    try:
        yield
    finally:
        ctx.live.close_streams()
        ctx.logs.close()
        for task in [runner, *ctx.jobs.tasks]:
            task.cancel()
        for task in [runner, *ctx.jobs.tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await ctx.forwarder.close()


def create_app(
    store: Store,
    *,
    rescan: Rescan | None = None,
    coordinator: CoordinatorControl | None = None,
    coordinator_url: str | None = None,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_proxy_body_bytes: int = DEFAULT_MAX_PROXY_BODY,
    refresh_s: float = 1.0,
    machine_names: frozenset[str] | None = None,
    max_nodes: int = DEFAULT_MAX_NODES,
    registrations: RateLimit | None = None,
    clock: Callable[[], float] = time.time,
    history_step_s: float = DEFAULT_STEP_S,
    coordinator_log: Path | None = None,
) -> FastAPI:
    """Build the dashboard.

    store: where everything shown comes from (EmbeddedStore or Redis store).
    rescan: async callable that runs (or asks for) one discovery pass of the monitor;
        None → POST /api/rescan answers 409.
    coordinator: the coordinator controller (`restart(reason)`, `status()`); None → the
        coordinator view comes from the store's CoordinatorRecord and restart answers 409.
    coordinator_url: base URL of the coordinator's llama-server (e.g. http://127.0.0.1:8081);
        `/v1/*` is forwarded there. None → `/v1/*` answers 503.
    token: the bearer token every POST and every /v1 request needs (CORRAL_TOKEN); None or
        "" → those all 401.
    max_body_bytes, max_proxy_body_bytes: the largest body a request may send, to /v1 and to
        everything else; past it, 413.
    machine_names: Host names accepted on loopback besides loopback ones; None → this
        machine's name and its /etc/hosts loopback names.
    max_nodes: live nodes `POST /api/nodes/heartbeat` takes at once (`--max-nodes`);
        registrations: new registrations per client address (token bucket; None → 10/s,
        bursts of 20); past either, 429 with Retry-After. A live node's heartbeat always passes.
    clock: wall time for the registration bounds and the history (tests pass a FakeClock).
    history_step_s: seconds between the history's samples (`GET /api/history`, the last hour).
    coordinator_log: the in-process coordinator's llama-server log, followed at `GET /api/logs`
        (with the token); None → 404, no coordinator here.
    """
    token = token or None
    live = LiveView(store, coordinator, refresh_s=refresh_s)
    figures = Figures()
    history = History(step_s=history_step_s)

    def feed_history() -> None:  # after each refresh: a status change, or a sample when due
        seen = observation(clock(), live.backends_items, live.coordinator(), figures.proxy_total)
        history.observe(seen)

    live.on_refresh.append(feed_history)
    page, csp = load_page()
    app = FastAPI(
        title="Corral",
        summary="llama.cpp RPC backends and their coordinator, from Corral's store",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load its assets from the internet
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    nodes = NodeAdmission(max_nodes, registrations)
    app.state.corral = AppContext(
        store=store,
        live=live,
        figures=figures,
        forwarder=Forwarder(coordinator_url, live, figures),
        registry=make_registry(live, figures),
        rescan=rescan,
        control=coordinator,
        token=token,
        page=page,
        page_csp=csp,
        nodes=nodes,
        clock=clock,
        history=history,
        logs=LogFollowers(coordinator_log),
        assets=load_assets(),
    )
    for router in ROUTERS:
        app.include_router(router)
    # The hottest read skips routing altogether; the guard, added last, is outermost, so even
    # that read is checked for its Host first.
    app.add_middleware(CachedBodyMiddleware, path=BACKENDS_PATH, body=lambda: live.backends_body)

    def precheck(client: str, node_id: str) -> Refusal | None:  # a flood turned away early
        return nodes.precheck(client, node_id, clock())

    app.add_middleware(
        GuardMiddleware,
        cfg=GuardConfig(
            token=token,
            max_body=max_body_bytes,
            max_proxy_body=max_proxy_body_bytes,
            machine_names=read_machine_names() if machine_names is None else machine_names,
        ),
        precheck=precheck,
    )
    return app
