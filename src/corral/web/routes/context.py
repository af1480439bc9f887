"""What every route reads: the app's one AppContext, put on `app.state.corral`, via `Ctx`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from prometheus_client import CollectorRegistry

from corral.store.base import Store
from corral.web.control import CoordinatorControl, Rescan
from corral.web.history import History
from corral.web.live import LiveView
from corral.web.logtail import LogFollowers
from corral.web.metrics import Figures
from corral.web.proxy import Forwarder
from corral.web.security import NodeAdmission

JSON = "application/json"


@dataclass
class Jobs:
    """The background work actions start: running tasks (cancelled at shutdown) and whether a
    coordinator restart is under way (a discovery run's flag is `Figures.scan_running`)."""

    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    restarting: bool = False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@dataclass(frozen=True)
class AppContext:
    """Everything one app instance holds; reachable as `app.state.corral`."""

    store: Store
    live: LiveView
    figures: Figures
    forwarder: Forwarder
    registry: CollectorRegistry
    rescan: Rescan | None
    control: CoordinatorControl | None
    token: str | None
    page: bytes
    page_csp: str
    jobs: Jobs = field(default_factory=Jobs)
    # Which node heartbeats the API takes (cap on live nodes, rate of new ones per address),
    # on `clock` (wall time: the store's registrations expire by it too).
    nodes: NodeAdmission = field(default_factory=NodeAdmission)
    clock: Callable[[], float] = time.time
    # The last hour of figures and statuses (fed by LiveView's refreshes), and the followers of
    # the coordinator's llama-server log (path None: no coordinator in this process).
    history: History = field(default_factory=History)
    logs: LogFollowers = field(default_factory=lambda: LogFollowers(None))
    # The vendored files the page loads (name -> body, content type), read once at start.
    assets: dict[str, tuple[bytes, str]] = field(default_factory=dict)


def app_context(app: FastAPI) -> AppContext:
    """The context `create_app` put on `app`."""
    ctx: AppContext = app.state.corral
    return ctx


def request_context(request: Request) -> AppContext:
    """The dependency behind `Ctx`: the context of the app serving `request`."""
    return app_context(request.app)


# A route parameter `ctx: Ctx` is the AppContext; it adds nothing to the OpenAPI document.
Ctx = Annotated[AppContext, Depends(request_context)]
