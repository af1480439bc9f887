"""The dashboard app: built by `create_app(store, ...)`, every collaborator passed in.

Every answer comes from the store (through LiveView's in-memory copy, refreshed on the store's
change notifications) or from the collaborators' in-memory state; no request scans or probes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from corral.store.base import Store
from corral.web.control import CoordinatorControl, Rescan
from corral.web.live import LiveView, dumps
from corral.web.metrics import Figures, make_registry, metrics_json
from corral.web.proxy import Forwarder
from corral.web.schemas import (
    AcceptedOut,
    BackendOut,
    CoordinatorOut,
    ErrorOut,
    EventOut,
    HealthOut,
    HeartbeatIn,
    HeartbeatOut,
    MetricsOut,
    RestartIn,
    event_to_json,
)
from corral.web.security import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_PROXY_BODY,
    ASGIApp,
    GuardConfig,
    GuardMiddleware,
    Receive,
    Scope,
    Send,
    read_machine_names,
)

log = logging.getLogger(__name__)

STREAM_KEEPALIVE_S = 15.0
JSON = "application/json"
BACKENDS_PATH = "/api/rpc_backends"


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


@dataclass
class WebContext:
    """Everything one app instance holds; reachable as `app.state.corral`."""

    store: Store
    live: LiveView
    figures: Figures
    forwarder: Forwarder
    registry: CollectorRegistry
    rescan: Rescan | None
    control: CoordinatorControl | None
    token: str | None
    page: bytes
    page_csp: str
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    restarting: bool = False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def load_page() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that allows exactly its inline script and style."""
    text = (resources.files("corral.web") / "static" / "index.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
            for s in found
        )

    csp = (
        "default-src 'none'; "
        f"script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return text.encode(), csp


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
) -> FastAPI:
    """Build the dashboard.

    store: where everything shown comes from (EmbeddedStore or Redis store).
    rescan: async callable that runs (or asks for) one discovery pass of the monitor;
        None → POST /api/rescan answers 409.
    coordinator: the coordinator controller (`restart(reason)`, `status()`); None → the
        coordinator view comes from the store's CoordinatorRecord and restart answers 409.
    coordinator_url: base URL of the coordinator's llama-server (e.g. http://127.0.0.1:8081);
        `/v1/*` is forwarded there. None → `/v1/*` answers 503.
    token: the bearer token every POST needs (CORRAL_TOKEN); None or "" → POSTs all 401.
    machine_names: Host names accepted on loopback besides loopback ones; None → this
        machine's name and its /etc/hosts loopback names.
    """
    token = token or None
    live = LiveView(store, coordinator, refresh_s=refresh_s)
    figures = Figures()
    page, csp = load_page()
    ctx = WebContext(
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
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await ctx.forwarder.start()
        runner = asyncio.create_task(live.run())
        await live.wait_first(5.0)
        try:
            yield
        finally:
            live.close_streams()
            for task in [runner, *ctx.tasks]:
                task.cancel()
            for task in [runner, *ctx.tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await ctx.forwarder.close()

    app = FastAPI(
        title="Corral",
        summary="llama.cpp RPC backends and their coordinator, from Corral's store",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load its assets from the internet
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.corral = ctx
    # The hottest read skips routing altogether; the guard, added last, is outermost, so even
    # that read is checked for its Host first.
    app.add_middleware(CachedBodyMiddleware, path=BACKENDS_PATH, body=lambda: live.backends_body)
    app.add_middleware(
        GuardMiddleware,
        cfg=GuardConfig(
            token=token,
            max_body=max_body_bytes,
            max_proxy_body=max_proxy_body_bytes,
            machine_names=read_machine_names() if machine_names is None else machine_names,
        ),
    )
    bearer = HTTPBearer(auto_error=False, description="CORRAL_TOKEN")
    refusals: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorOut, "description": "Body is not UTF-8 JSON"},
        401: {"model": ErrorOut, "description": "Missing or wrong token"},
        413: {"model": ErrorOut, "description": "Body too large"},
        415: {"model": ErrorOut, "description": "Body is not JSON"},
        421: {"model": ErrorOut, "description": "Came in on loopback for another host's name"},
    }
    acting = [Depends(bearer)]

    @app.get("/", include_in_schema=False)
    async def page_view() -> Response:
        return HTMLResponse(
            ctx.page,
            headers={
                "Content-Security-Policy": ctx.page_csp,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    @app.get("/healthz", response_model=HealthOut, tags=["health"])
    async def healthz() -> Response:
        age = live.snapshot_age_s()
        ok = live.store_error is None and age is not None and age < max(5.0, 5 * refresh_s)
        body = {
            "status": "ok" if ok else "degraded",
            "store": live.store_error or ("ok" if age is not None else "not read yet"),
            "snapshot_age_s": age,
        }
        return Response(dumps(body), status_code=200 if ok else 503, media_type=JSON)

    @app.get(
        BACKENDS_PATH,
        response_model=list[BackendOut],
        tags=["backends"],
        summary="Every known RPC backend, as `corral backends --json` plus last_seen, in_use",
    )
    async def rpc_backends() -> Response:  # answered by CachedBodyMiddleware; here for the schema
        return Response(live.backends_body, media_type=JSON)

    @app.get("/api/coordinator", response_model=CoordinatorOut, tags=["coordinator"])
    async def coordinator_view() -> Response:
        return Response(dumps(live.coordinator()), media_type=JSON)

    @app.get("/api/metrics", response_model=MetricsOut, tags=["metrics"])
    async def metrics_view() -> Response:
        return Response(dumps(metrics_json(live, figures)), media_type=JSON)

    @app.get("/api/events", response_model=list[EventOut], tags=["events"])
    async def events_view(
        limit: Annotated[int, Query(ge=1, le=1000, description="How many, most recent last")] = 100,
    ) -> Response:
        events = await store.events(limit)
        return Response(dumps([event_to_json(e) for e in events]), media_type=JSON)

    @app.get(
        "/api/stream",
        tags=["events"],
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-sent events: `backends` (the /api/rpc_backends list),"
                " `coordinator` (the /api/coordinator object), `event` (one /api/events item)."
                " The first two are sent at once on connect.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def stream() -> StreamingResponse:
        async def messages() -> AsyncIterator[bytes]:
            yield b"retry: 3000\n\n"
            with live.listen() as listener:
                while True:
                    try:
                        item = await listener.get(STREAM_KEEPALIVE_S)
                    except EOFError:
                        return
                    if item is None:
                        yield b": keep-alive\n\n"
                        continue
                    name, body = item
                    yield b"event: " + name.encode() + b"\ndata: " + body + b"\n\n"

        return StreamingResponse(
            messages(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.post(
        "/api/rescan",
        status_code=202,
        response_model=AcceptedOut,
        tags=["backends"],
        dependencies=acting,
        responses={**refusals, 409: {"model": ErrorOut, "description": "No monitor attached"}},
    )
    async def rescan_now() -> Response:
        if ctx.rescan is None:
            return _error(409, "this dashboard has no discovery to run (no monitor attached)")
        if figures.scan_running:
            return _accepted("a discovery run is already running")
        figures.scans_requested += 1
        figures.scan_running = True
        ctx.spawn(_run_rescan(ctx))
        return _accepted("discovery run started; results show up as the store changes")

    @app.post(
        "/api/coordinator/restart",
        status_code=202,
        response_model=AcceptedOut,
        tags=["coordinator"],
        dependencies=acting,
        responses={**refusals, 409: {"model": ErrorOut, "description": "No coordinator here"}},
    )
    async def restart_coordinator(
        body: Annotated[RestartIn | None, Body()] = None,
    ) -> Response:
        if ctx.control is None:
            return _error(409, "this dashboard does not run a coordinator")
        if ctx.restarting:
            return _accepted("a restart is already in progress")
        reason = body.reason if body is not None else RestartIn().reason
        ctx.restarting = True
        ctx.spawn(_run_restart(ctx, reason))
        return _accepted(f"restarting: {reason}")

    @app.post(
        "/api/nodes/heartbeat",
        response_model=HeartbeatOut,
        tags=["nodes"],
        dependencies=acting,
        responses=refusals,
    )
    async def heartbeat(body: HeartbeatIn) -> Response:
        reg = body.to_registration(received_at=time.time())
        await store.register_node(reg)
        live.poke()
        out = {"node_id": reg.node_id, "endpoint": str(reg.endpoint), "ttl_s": reg.ttl_s}
        return Response(dumps(out), media_type=JSON)

    @app.get("/metrics", include_in_schema=True, tags=["metrics"], response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route(
        "/v1/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def v1(request: Request, path: str) -> Response:
        return await ctx.forwarder.forward(request, path)

    return app


def _error(status: int, detail: str) -> Response:
    return JSONResponse({"detail": detail}, status_code=status)


def _accepted(detail: str) -> Response:
    return Response(dumps({"accepted": True, "detail": detail}), status_code=202, media_type=JSON)


async def _run_rescan(ctx: WebContext) -> None:
    fig = ctx.figures
    started = time.monotonic()
    fig.last_scan_started = time.time()
    assert ctx.rescan is not None
    try:
        await ctx.rescan()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        fig.scans_failed += 1
        fig.last_scan_error = f"{type(exc).__name__}: {exc}"
        log.warning("dashboard: rescan failed: %s", fig.last_scan_error)
    else:
        fig.scans_completed += 1
        fig.last_scan_error = None
    finally:
        fig.scan_running = False
        fig.last_scan_duration_s = round(time.monotonic() - started, 3)
        ctx.live.poke()


async def _run_restart(ctx: WebContext, reason: str) -> None:
    assert ctx.control is not None
    try:
        await ctx.control.restart(reason)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("dashboard: coordinator restart failed: %s: %s", type(exc).__name__, exc)
    finally:
        ctx.restarting = False
        ctx.live.poke()
