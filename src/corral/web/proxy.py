"""`/v1/*` forwarded to the coordinator's llama-server, streaming both ways it matters.

The caller's `Authorization` (our token) is not passed on. The answer is relayed as it arrives,
so `"stream": true` chat completions reach the browser token by token. llama-server's own
`timings.predicted_per_second`, when the answer carries it, becomes the observed tokens/s.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from corral.web.live import LiveView
from corral.web.metrics import Figures
from corral.web.v1_paths import Refused, v1_route

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
    }
)
_TPS = re.compile(rb'"predicted_per_second"\s*:\s*([0-9][0-9.eE+-]*)')
_TAIL = 16 * 1024


def tokens_per_second(tail: bytes) -> float | None:
    """Pure: the last `predicted_per_second` in an answer's tail, if any."""
    found = _TPS.findall(tail)
    if not found:
        return None
    try:
        value = float(found[-1])
    except ValueError:
        return None
    return round(value, 3) if value >= 0 and value < 1e9 else None


class Forwarder:
    def __init__(self, base_url: str | None, live: LiveView, figures: Figures) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.live = live
        self.figures = figures
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self.base_url is not None:
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=10.0),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                trust_env=False,
            )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def forward(self, request: Request) -> Response:
        route = v1_route(request.scope.get("raw_path") or request.url.path.encode(), request.method)
        if isinstance(route, Refused):
            return JSONResponse({"detail": route.detail}, status_code=route.status)
        if self.base_url is None or self.client is None:
            return JSONResponse(
                {"detail": "no coordinator is configured for this dashboard"}, status_code=503
            )
        fig = self.figures
        url = f"{self.base_url}/v1/{route}"  # built from the allow-list, not the request
        query = request.url.query
        if query:
            url += f"?{query}"
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = await request.body()
        started = time.monotonic()
        fig.proxy_total += 1
        fig.proxy_in_flight += 1
        upstream_req = self.client.build_request(request.method, url, headers=headers, content=body)
        try:
            upstream = await self.client.send(upstream_req, stream=True)
        except httpx.HTTPError as exc:
            self._done(started, failed=True)
            reason = str(exc) or type(exc).__name__
            return JSONResponse(
                {"detail": f"coordinator unreachable at {self.base_url}: {reason}"},
                status_code=502,
            )
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        state = {"done": False, "failed": upstream.status_code >= 500}

        def finish(tail: bytes) -> None:
            if state["done"]:
                return
            state["done"] = True
            tps = tokens_per_second(tail)
            if tps is not None:
                self.live.observed_tps = tps
                self.live.poke()
            self._done(started, failed=state["failed"])

        async def relay() -> AsyncIterator[bytes]:
            tail = b""
            try:
                async for chunk in upstream.aiter_raw():
                    tail = (tail + chunk)[-_TAIL:]
                    yield chunk
            except httpx.HTTPError:
                state["failed"] = True  # the coordinator died mid-answer: the client sees it cut
            finally:
                finish(tail)
                await upstream.aclose()

        async def cleanup() -> None:  # also runs when the client left before the first byte
            finish(b"")
            await upstream.aclose()

        return StreamingResponse(
            relay(),
            status_code=upstream.status_code,
            headers=out_headers,
            background=BackgroundTask(cleanup),
        )

    def _done(self, started: float, failed: bool) -> None:
        fig = self.figures
        elapsed = time.monotonic() - started
        fig.proxy_in_flight -= 1
        fig.proxy_seconds_total += elapsed
        fig.proxy_last_s = round(elapsed, 6)
        if failed:
            fig.proxy_failed += 1
