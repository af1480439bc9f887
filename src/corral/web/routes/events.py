"""What happened: the stored event history, and the live server-sent event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from corral.web.live import LiveView, dumps
from corral.web.routes.context import JSON, Ctx
from corral.web.schemas import EventOut, event_to_json

STREAM_KEEPALIVE_S = 15.0

router = APIRouter()


@router.get("/api/events", response_model=list[EventOut], tags=["events"])
async def events_view(
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=1000, description="How many, most recent last")] = 100,
) -> Response:
    events = await ctx.store.events(limit)
    return Response(dumps([event_to_json(e) for e in events]), media_type=JSON)


@router.get(
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
async def stream(ctx: Ctx) -> StreamingResponse:
    return StreamingResponse(
        _messages(ctx.live),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _messages(live: LiveView) -> AsyncIterator[bytes]:
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
