"""Tell the service manager when the control plane really serves (see corral.net.notify).

READY=1 goes out once the dashboard answers `GET /healthz` with 200 over HTTP, not when its
socket is bound: only then do a page, the API and the /v1 forwarding answer (the app has started
and read the store). STOPPING=1 goes out as soon as `stop` is set, before the parts take their
time to stop. There is no deadline of its own: under systemd, TimeoutStartSec= bounds the wait
and a plane that never answers is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

import httpx

from corral.net.notify import Notifier

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
REQUEST_TIMEOUT_S = 2.0
RETRY_S = 0.1


def probe_url(host: str, port: int) -> str:
    """Pure: where this machine reaches a dashboard bound to `host`: an unspecified address
    (every interface) through loopback of its family, any other address as itself."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if addr.is_unspecified:
        addr = ipaddress.ip_address("::1" if addr.version == 6 else "127.0.0.1")
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"http://{shown}:{port}"


async def _answers(client: httpx.AsyncClient, url: str) -> int | None:
    """The status `url` answers with, or None when nothing answered."""
    try:
        reply = await client.get(url + HEALTH_PATH)
    except httpx.HTTPError:
        return None
    return reply.status_code


async def _until_serving(url: str) -> None:
    said: int | None = None
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        while (code := await _answers(client, url)) != 200:
            if code is not None and code != said:
                log.info("service: the dashboard answers %s %d; not ready yet", HEALTH_PATH, code)
                said = code
            await asyncio.sleep(RETRY_S)


async def report_service(notifier: Notifier, url: str, stop: asyncio.Event) -> None:
    """READY=1 once the dashboard at `url` answers; STOPPING=1 once `stop` is set. Returns
    after STOPPING=1 (so the caller awaits it briefly after setting `stop`)."""
    serving = asyncio.create_task(_until_serving(url))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done() and serving.exception() is None and not stop.is_set():
            notifier.ready(f"serving: dashboard on {url}/")
        await stopped
    finally:
        for task in (serving, stopped):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        notifier.stopping()
