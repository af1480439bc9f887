"""The dashboard page: the static index.html, with a CSP that allows exactly its inline code."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from corral.web.routes.context import Ctx

router = APIRouter()


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
        # 'self': the vendored charting library (routes/assets.py), nothing else from anywhere.
        f"script-src 'self' {hashes('script')}; style-src 'self' {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return text.encode(), csp


@router.get("/", include_in_schema=False)
async def page_view(ctx: Ctx) -> Response:
    return HTMLResponse(
        ctx.page,
        headers={
            "Content-Security-Policy": ctx.page_csp,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
