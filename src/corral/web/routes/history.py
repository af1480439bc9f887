"""The last hour as JSON, for the page's charts: `GET /api/history`, from memory."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from corral.web.live import dumps
from corral.web.routes.context import JSON, Ctx
from corral.web.schemas import HistoryOut

router = APIRouter()


@router.get(
    "/api/history",
    response_model=HistoryOut,
    tags=["metrics"],
    summary="Tokens/s, requests, probe latencies and statuses over the last hour",
)
async def history_view(ctx: Ctx) -> Response:
    return Response(ctx.history.body(dumps), media_type=JSON, headers={"Cache-Control": "no-store"})
