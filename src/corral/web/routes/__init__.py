"""The dashboard's routes: one APIRouter per module, every one reading the app's AppContext.

`ROUTERS` is the order `create_app` includes them in, which is also the order of the paths in
the OpenAPI document.
"""

from fastapi import APIRouter

from corral.web.routes import (
    actions,
    assets,
    events,
    history,
    logs,
    page,
    prometheus,
    proxy,
    status,
)
from corral.web.routes.context import AppContext, app_context

ROUTERS: tuple[APIRouter, ...] = (
    page.router,
    assets.router,
    status.router,
    history.router,
    events.router,
    logs.router,
    actions.router,
    prometheus.router,
    proxy.router,
)

__all__ = ["ROUTERS", "AppContext", "app_context"]
