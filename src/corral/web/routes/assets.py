"""The files the page loads besides itself (a charting library), vendored in the package.

Only the names in VENDOR are served, read once when the app is built; nothing comes from the
internet (static/vendor/README.md says what each one is and its version).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from corral.web.routes.context import Ctx

VENDOR_PATH = "/static/vendor"
VENDOR: dict[str, str] = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}

router = APIRouter()


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Every VENDOR file's body and content type (a file missing from the package raises)."""
    folder = resources.files("corral.web") / "static" / "vendor"
    return {name: ((folder / name).read_bytes(), kind) for name, kind in VENDOR.items()}


@router.get(VENDOR_PATH + "/{name}", include_in_schema=False)
async def vendor_file(ctx: Ctx, name: str) -> Response:
    found = ctx.assets.get(name)
    if found is None:
        return JSONResponse({"detail": f"no such file: {name[:100]}"}, status_code=404)
    body, kind = found
    return Response(
        body,
        media_type=kind,
        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
