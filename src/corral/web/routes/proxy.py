"""/v1/*: forwarded to the coordinator's llama-server by the app's Forwarder."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from corral.web.routes.context import Ctx

router = APIRouter()


@router.api_route(
    "/v1/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
async def v1(ctx: Ctx, request: Request, path: str) -> Response:
    del path  # the forwarder reads the raw path itself: it must see it undecoded
    return await ctx.forwarder.forward(request)
