"""Prometheus exposition at /metrics, from the app's collector registry."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from corral.web.routes.context import Ctx

router = APIRouter()


@router.get("/metrics", include_in_schema=True, tags=["metrics"], response_class=Response)
async def prometheus(ctx: Ctx) -> Response:
    return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)
