"""The node agent's side of `POST /api/nodes/heartbeat`."""

from __future__ import annotations

import httpx

from corral.store.base import NodeRegistration
from corral.store.codec import node_to_json

HEARTBEAT_PATH = "/api/nodes/heartbeat"


class HeartbeatRefused(RuntimeError):
    """The dashboard answered, but not with 2xx; the message carries its `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"dashboard refused the heartbeat ({status}): {detail}")
        self.status = status
        self.detail = detail


async def post_heartbeat(
    url: str,
    token: str | None,
    reg: NodeRegistration,
    *,
    client: httpx.AsyncClient | None = None,
    timeout_s: float = 5.0,
) -> None:
    """Send one registration to the dashboard at `url` (e.g. http://10.0.0.5:8080).

    Raises HeartbeatRefused on a 4xx/5xx answer, httpx.HTTPError when it cannot be reached.
    Pass a long-lived `client` to reuse its connection from beat to beat.
    """
    target = url.rstrip("/") + HEARTBEAT_PATH
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = node_to_json(reg)
    if client is None:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as own:
            response = await own.post(target, json=body, headers=headers)
    else:
        response = await client.post(target, json=body, headers=headers, timeout=timeout_s)
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    raise HeartbeatRefused(response.status_code, str(detail)[:500])
