"""Tell the service manager when the node serves (see corral.net.notify).

READY=1 goes out on the first heartbeat whose backend answered the node's own probe (`ready`),
or is held by a client (`busy`: a ggml-rpc-server serves one client at a time and answers nobody
else meanwhile, so a held backend is serving; `corral node --attach` may meet one held already).
A backend that is offline, incompatible or not an RPC server does not make the node ready, and
each change of that state is a STATUS line.
"""

from __future__ import annotations

from corral.net.notify import Notifier
from corral.store.base import NodeRegistration
from corral.types import Status

SERVING = (Status.READY, Status.BUSY)


def service_status(reg: NodeRegistration) -> str:
    """Pure: one STATUS line for the backend this registration describes."""
    line = f"backend {reg.endpoint} {reg.status}"
    if reg.status is Status.BUSY and reg.client:
        line += f" (held by {reg.client})"
    if reg.restarts:
        line += f"; restarted {reg.restarts} times"
    return line


class NodeReadiness:
    """A heartbeat publisher (NodeAgent's `extra_publishers`) that notifies the manager."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    async def __call__(self, reg: NodeRegistration) -> None:
        if reg.status in SERVING:
            self.notifier.ready(service_status(reg))
        else:
            self.notifier.status(service_status(reg))
