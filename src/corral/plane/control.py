"""The dashboard's handle on an in-process coordinator (web.control.CoordinatorControl).

`restart(reason)` asks the Runner for a planned restart (drain, then start with every backend
ready now) and returns once llama-server serves again. `status()` is the Runner's own view: the
record it publishes, plus generation speed read from llama-server's /metrics by `run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import httpx

from corral.coordinator.runner import Runner
from corral.types import CoordinatorState
from corral.web.control import CoordinatorStatus

log = logging.getLogger(__name__)

_TOKENS = "llamacpp:tokens_predicted_total"
_SECONDS = "llamacpp:tokens_predicted_seconds_total"


class RestartFailed(RuntimeError):
    """The restart was asked for, but llama-server did not come back."""


def generation_counters(metrics: str) -> tuple[float, float] | None:
    """Pure: (tokens predicted, seconds spent predicting) from /metrics text, if present."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in (_TOKENS, _SECONDS):
            with contextlib.suppress(ValueError):
                found[name] = float(value)
    if _TOKENS not in found or _SECONDS not in found:
        return None
    return found[_TOKENS], found[_SECONDS]


def tokens_per_second(before: tuple[float, float] | None, now: tuple[float, float]) -> float | None:
    """Pure: generation speed between two readings (None: the first reading of a llama-server,
    counted from 0); None when nothing was generated since. A drop also means "from 0"."""
    base = before if before is not None and before[0] <= now[0] else (0.0, 0.0)
    tokens, seconds = now[0] - base[0], now[1] - base[1]
    if tokens <= 0 or seconds <= 0:
        return None
    return round(tokens / seconds, 1)


@dataclass
class RunnerControl:
    runner: Runner
    restart_timeout_s: float = 180.0
    poll_s: float = 2.0
    tokens_per_second: float | None = None
    _last: tuple[float, float] | None = field(default=None, init=False)
    _last_pid: int | None = field(default=None, init=False)

    async def restart(self, reason: str) -> None:
        """Returns once llama-server serves again. A model load has no deadline (it fails by
        itself when it stalls), so `restart_timeout_s` counts only the time outside loading."""
        waiter = self.runner.request_restart(reason)
        left = self.restart_timeout_s
        while True:
            try:
                serving = await asyncio.wait_for(asyncio.shield(waiter), min(left, self.poll_s))
                break
            except TimeoutError:
                if self.runner.load is None:
                    left -= self.poll_s
                if left <= 0:
                    waiter.cancel()
                    raise RestartFailed(
                        f"llama-server not serving {self.restart_timeout_s:g} s after the "
                        "restart (not counting the model's load)"
                    ) from None
        if not serving:
            raise RestartFailed("llama-server failed to start after the restart (see events)")

    def status(self) -> CoordinatorStatus:
        rec = self.runner.publish.record
        server = self.runner.server  # what it holds now; the record may still name the last set
        serving = rec.state is CoordinatorState.SERVING
        return CoordinatorStatus(
            state=rec.state,
            pid=rec.pid,
            port=rec.port,
            model=rec.model,
            backends=server.backends if server else (),
            uptime_s=round(time.time() - rec.started_at, 1) if serving and rec.started_at else None,
            restarts=rec.restarts,
            last_reason=rec.last_reason,
            tokens_per_second=self.tokens_per_second if serving else None,
            memory=rec.memory,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: read llama-server's generation counters every `poll_s` while serving.

        No keep-alive: llama-server gives each open connection a thread of its small pool."""
        async with httpx.AsyncClient(
            base_url=self.runner.opts.base_url,
            timeout=1.0,
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,
        ) as client:
            while not stop.is_set():
                if self.runner.publish.record.state is CoordinatorState.SERVING:
                    await self._sample(client)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)

    async def _sample(self, client: httpx.AsyncClient) -> None:
        try:
            reply = await client.get("/metrics")
        except httpx.HTTPError:
            return  # the runner notices a dead llama-server; speed is only a nicety
        now = generation_counters(reply.text) if reply.status_code == 200 else None
        if now is None:
            return
        pid = self.runner.publish.record.pid
        if pid != self._last_pid:  # a new llama-server: its speed is unknown until it generates
            self._last, self.tokens_per_second = None, None
        speed = tokens_per_second(self._last, now)
        if speed is not None:
            self.tokens_per_second = speed
        self._last, self._last_pid = now, pid
