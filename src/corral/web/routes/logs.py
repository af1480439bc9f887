"""`GET /api/logs`: the coordinator's llama-server log, its last lines and then as it grows.

Token-guarded like the actions (the guard's `guarded_reads`): a log can hold prompts. Plain
text, one line per log line, chunked; it ends when the client leaves or the dashboard stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer

from corral.web.logtail import DEFAULT_LINES, MAX_LINE, MAX_LINES, LogFollowers, follow
from corral.web.routes.context import Ctx
from corral.web.schemas import ErrorOut

router = APIRouter(dependencies=[Depends(HTTPBearer(auto_error=False, description="CORRAL_TOKEN"))])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": f"The last `lines` lines, then each new one as it is written; lines cut"
        f" at {MAX_LINE} bytes (marked …). Never ends by itself.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    400: {"model": ErrorOut, "description": "The Host header is not one host[:port]"},
    401: {"model": ErrorOut, "description": "Missing or wrong token"},
    404: {"model": ErrorOut, "description": "No coordinator runs in this dashboard's process"},
    421: {"model": ErrorOut, "description": "Came in on loopback for another host's name"},
    429: {"model": ErrorOut, "description": "As many log followers as allowed already"},
}


@router.get("/api/logs", tags=["coordinator"], response_class=Response, responses=_RESPONSES)
async def logs_view(
    ctx: Ctx,
    lines: Annotated[
        int, Query(ge=0, le=MAX_LINES, description="How many of the last lines first")
    ] = DEFAULT_LINES,
) -> Response:
    followers = ctx.logs
    if followers.path is None:
        return JSONResponse(
            {
                "detail": "no coordinator runs in this dashboard's process (corral dashboard, or"
                " corral up without --model): llama-server's log is on the machine that runs"
                " it, beside `corral coordinator run` or `corral up --model`"
            },
            status_code=404,
        )
    if not followers.admit():
        return JSONResponse(
            {
                "detail": f"{followers.max_clients} clients already follow the log; close one"
                " and try again"
            },
            status_code=429,
            headers={"Retry-After": "5"},
        )
    return StreamingResponse(
        _lines(followers, followers.path, lines),
        media_type="text/plain; charset=utf-8",
        headers={
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def _lines(followers: LogFollowers, path: Path, lines: int) -> AsyncIterator[bytes]:
    try:
        async for line in follow(path, lines, look_s=followers.look_s, stop=followers.closing):
            yield line.encode() + b"\n"
    finally:
        followers.leave()
