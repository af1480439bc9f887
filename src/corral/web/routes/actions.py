"""The token-guarded POSTs (rescan, coordinator restart, node heartbeat) and the jobs they start.

GuardMiddleware checks the token and the body before any of these run; the refusals it sends
are documented here, on each action, along with `HTTPBearer` for the schema. The heartbeat is
bounded besides (the app's NodeAdmission): a cap on live nodes and a rate of new registrations
per client address, 429 with Retry-After past either; a registered node's heartbeat always
passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer

from corral.web.live import dumps
from corral.web.routes.context import JSON, AppContext, Ctx
from corral.web.schemas import AcceptedOut, ErrorOut, HeartbeatIn, HeartbeatOut, RestartIn

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(HTTPBearer(auto_error=False, description="CORRAL_TOKEN"))])


def _responses(conflict: str | None = None) -> dict[int | str, dict[str, Any]]:
    """The guard's refusals, and a 409 saying `conflict` when there is one."""
    out: dict[int | str, dict[str, Any]] = {
        400: {
            "model": ErrorOut,
            "description": "Body is not UTF-8 JSON, or the Host header is not one host[:port]",
        },
        401: {"model": ErrorOut, "description": "Missing or wrong token"},
        413: {"model": ErrorOut, "description": "Body too large"},
        415: {"model": ErrorOut, "description": "Body is not JSON"},
        421: {"model": ErrorOut, "description": "Came in on loopback for another host's name"},
        422: {
            "description": "Body holds NaN or Infinity (the guard says which), or fails validation",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/ErrorOut"},
                            {"$ref": "#/components/schemas/HTTPValidationError"},
                        ]
                    }
                }
            },
        },
    }
    if conflict is not None:
        out[409] = {"model": ErrorOut, "description": conflict}
    return out


@router.post(
    "/api/rescan",
    status_code=202,
    response_model=AcceptedOut,
    tags=["backends"],
    responses=_responses("No monitor attached"),
)
async def rescan_now(ctx: Ctx) -> Response:
    if ctx.rescan is None:
        return _error(409, "this dashboard has no discovery to run (no monitor attached)")
    figures = ctx.figures
    if figures.scan_running:
        return _accepted("a discovery run is already running")
    figures.scans_requested += 1
    figures.scan_running = True
    ctx.jobs.spawn(_run_rescan(ctx))
    return _accepted("discovery run started; results show up as the store changes")


@router.post(
    "/api/coordinator/restart",
    status_code=202,
    response_model=AcceptedOut,
    tags=["coordinator"],
    responses=_responses("No coordinator here"),
)
async def restart_coordinator(
    ctx: Ctx,
    body: Annotated[RestartIn | None, Body()] = None,
) -> Response:
    if ctx.control is None:
        return _error(409, "this dashboard does not run a coordinator")
    if ctx.jobs.restarting:
        return _accepted("a restart is already in progress")
    reason = body.reason if body is not None else RestartIn().reason
    ctx.jobs.restarting = True
    ctx.jobs.spawn(_run_restart(ctx, reason))
    return _accepted(f"restarting: {reason}")


_TOO_MANY: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorOut,
        "description": "As many nodes live as --max-nodes, or new registrations from this"
        " address too fast; a registered node's heartbeat is never refused so",
        "headers": {
            "Retry-After": {
                "description": "Seconds until a registration may pass",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }
}


@router.post(
    "/api/nodes/heartbeat",
    response_model=HeartbeatOut,
    tags=["nodes"],
    responses={**_responses(), **_TOO_MANY},
)
async def heartbeat(ctx: Ctx, request: Request, body: HeartbeatIn) -> Response:
    reg = body.to_registration(received_at=time.time())
    client = request.client.host if request.client is not None else "unknown"
    node_id, endpoint = reg.node_id, str(reg.endpoint)
    refused = ctx.nodes.admit(client, node_id, endpoint, reg.ttl_s, ctx.clock())
    if refused is not None:
        return JSONResponse(
            {"detail": refused.detail}, status_code=refused.status, headers=refused.headers
        )
    try:
        await ctx.store.register_node(reg)
    except BaseException:
        ctx.nodes.forget(node_id)  # not stored: its place is free again
        raise
    ctx.live.poke()
    out = {"node_id": node_id, "endpoint": endpoint, "ttl_s": reg.ttl_s}
    return Response(dumps(out), media_type=JSON)


def _error(status: int, detail: str) -> Response:
    return JSONResponse({"detail": detail}, status_code=status)


def _accepted(detail: str) -> Response:
    return Response(dumps({"accepted": True, "detail": detail}), status_code=202, media_type=JSON)


async def _run_rescan(ctx: AppContext) -> None:
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


async def _run_restart(ctx: AppContext, reason: str) -> None:
    assert ctx.control is not None
    try:
        await ctx.control.restart(reason)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("dashboard: coordinator restart failed: %s: %s", type(exc).__name__, exc)
    finally:
        ctx.jobs.restarting = False
        ctx.live.poke()
