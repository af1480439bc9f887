"""Where things stand now, as JSON: health, backends, coordinator, metrics, all from memory.

Each answer is LiveView's in-memory copy of the store (or the collaborators' own state), so no
request reads the store, scans or probes.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from corral.web.live import dumps
from corral.web.metrics import metrics_json
from corral.web.routes.context import JSON, Ctx
from corral.web.schemas import BackendOut, CoordinatorOut, HealthOut, MetricsOut

BACKENDS_PATH = "/api/rpc_backends"

router = APIRouter()


@router.get("/healthz", response_model=HealthOut, tags=["health"])
async def healthz(ctx: Ctx) -> Response:
    live = ctx.live
    age = live.snapshot_age_s()
    ok = live.store_error is None and age is not None and age < max(5.0, 5 * live.refresh_s)
    body = {
        "status": "ok" if ok else "degraded",
        "store": live.store_error or ("ok" if age is not None else "not read yet"),
        "snapshot_age_s": age,
    }
    return Response(dumps(body), status_code=200 if ok else 503, media_type=JSON)


@router.get(
    BACKENDS_PATH,
    response_model=list[BackendOut],
    tags=["backends"],
    summary="Every known RPC backend, as `corral backends --json` plus last_seen, in_use",
)
async def rpc_backends(ctx: Ctx) -> Response:  # answered by CachedBodyMiddleware; for the schema
    return Response(ctx.live.backends_body, media_type=JSON)


@router.get("/api/coordinator", response_model=CoordinatorOut, tags=["coordinator"])
async def coordinator_view(ctx: Ctx) -> Response:
    return Response(dumps(ctx.live.coordinator()), media_type=JSON)


@router.get("/api/metrics", response_model=MetricsOut, tags=["metrics"])
async def metrics_view(ctx: Ctx) -> Response:
    return Response(dumps(metrics_json(ctx.live, ctx.figures)), media_type=JSON)
