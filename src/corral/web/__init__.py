"""The dashboard: HTTP API, live page, Prometheus metrics and /v1 forwarding, from the store.

Build with `create_app(store, rescan=..., coordinator=..., coordinator_url=..., token=...)`,
run with `await serve(app, host, port)`.
"""

from corral.node.heartbeat import HeartbeatRefused, post_heartbeat
from corral.web.app import create_app
from corral.web.control import CoordinatorControl, CoordinatorStatus, CoordinatorStatusLike, Rescan
from corral.web.security import InsecureBindError, check_bind, is_loopback_host
from corral.web.server import DEFAULT_HOST, DEFAULT_PORT, serve

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "CoordinatorControl",
    "CoordinatorStatus",
    "CoordinatorStatusLike",
    "HeartbeatRefused",
    "InsecureBindError",
    "Rescan",
    "check_bind",
    "create_app",
    "is_loopback_host",
    "post_heartbeat",
    "serve",
]
