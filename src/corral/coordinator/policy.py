"""The coordinator's decisions, as a pure function of what was observed.

No I/O here: the runner observes (its llama-server, /health, the connections it holds, fresh
probes of the backends it does not hold, node heartbeats) and acts; this module only says what
to do next, so every rule is unit-tested with plain values.

The rules:
- a backend in use that is lost, a llama-server that exits or stops answering, or requests that
  make no progress (a held backend gone silent) is a failover: stop at once (no drain, it is
  broken) and start again with what answers now;
- a backend that is ready but not in use joins only after it has been ready, without a gap, for
  `debounce_s`; then a planned restart (drain first) includes it. A flapping backend keeps
  resetting its clock, so it costs one restart, not one per flap;
- a start uses the backends it held before that still answer, plus the settled newcomers; the
  very first start uses every ready backend;
- fewer than `min_backends` ready: serve on local devices alone (with a warning) or wait;
- llama-server failing soon after its start, again and again, backs off exponentially;
- a restart someone asked for (with a reason) is planned: drain, stop, then start at once (any
  backoff waived) with every backend ready now: a person asked, so no debounce applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from corral.endpoint import Endpoint
from corral.models.plan import WhenShort


class OnChange(StrEnum):
    RESTART = "restart"
    IGNORE = "ignore"


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    min_backends: int = 1
    debounce_s: float = 10.0
    on_change: OnChange = OnChange.RESTART
    local_fallback: bool = True
    # The memory plan says the ready backends cannot hold the model: wait for more, or keep the
    # first layers on this host (see corral.models.plan). Acted on by the runner at each start.
    when_short: WhenShort = WhenShort.WAIT
    unhealthy_after_s: float = 10.0  # /health unanswered this long: llama-server is hung
    # Requests in flight and no work done this long: a backend in use stopped answering (it
    # holds llama-server in a network read). Generous: one big prompt batch can take a while.
    stall_after_s: float = 120.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_after_s: float = 30.0  # serving this long forgives earlier failures


@dataclass(frozen=True, slots=True)
class Serving:
    """The llama-server running now, as seen this tick."""

    backends: frozenset[Endpoint]
    started_at: float
    lost: Mapping[Endpoint, str] = field(default_factory=dict)  # held backend -> how it was lost
    unhealthy_since: float | None = None  # start of the current run of failed /health checks
    stalled_since: float | None = None  # requests in flight, no progress since then


@dataclass(frozen=True, slots=True)
class Exit:
    """The llama-server that ran has stopped without being asked to (reported once)."""

    backends: frozenset[Endpoint]
    started_at: float
    why: str  # exit status and the lines of its log that explain it
    while_loading: bool = False


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    ready: frozenset[Endpoint]  # fresh probes said ready; never includes a held backend
    serving: Serving | None = None
    exit: Exit | None = None
    requested: str | None = None  # someone asked for a restart, for this reason


@dataclass(frozen=True, slots=True)
class Memory:
    """What the policy carries from one decision to the next."""

    ready_since: Mapping[Endpoint, float] = field(default_factory=dict)
    last_set: frozenset[Endpoint] | None = None  # None until the first start
    lost: frozenset[Endpoint] = frozenset()  # dropped by the last failover; need the debounce
    failures: int = 0
    not_before: float = 0.0
    reason: str | None = None  # why the next start is a restart
    take_ready: bool = False  # the next start uses every ready backend (a requested restart)


class Do(StrEnum):
    NOTHING = "nothing"
    WAIT = "wait"
    START = "start"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Action:
    do: Do
    reason: str = ""
    backends: tuple[Endpoint, ...] = ()  # START: the --rpc set, in order
    restart: bool = False  # START: not the first start
    drain: bool = False  # STOP: planned, let requests in flight finish
    warning: str | None = None


def backoff_s(cfg: PolicyConfig, failures: int) -> float:
    """No wait for one failure (it may be a one-off); then base, 2*base, 4*base ... capped."""
    if failures <= 1:
        return 0.0
    return float(min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (failures - 2)))


def settled(mem: Memory, cfg: PolicyConfig, now: float) -> frozenset[Endpoint]:
    return frozenset(e for e, t in mem.ready_since.items() if now - t >= cfg.debounce_s)


def _names(endpoints: frozenset[Endpoint] | set[Endpoint]) -> str:
    return ",".join(str(e) for e in sorted(endpoints))


def _track(mem: Memory, obs: Observation) -> Memory:
    held = obs.serving.backends if obs.serving else frozenset()
    since = {e: mem.ready_since.get(e, obs.now) for e in obs.ready if e not in held}
    return replace(mem, ready_since=since)


def _after_exit(cfg: PolicyConfig, mem: Memory, obs: Observation, ex: Exit) -> Memory:
    gone = ex.backends - obs.ready
    if gone and not ex.while_loading:
        # A backend died and took llama-server with it: not llama-server's fault, no backoff.
        return replace(
            mem,
            lost=mem.lost | gone,
            not_before=obs.now,
            reason=f"backend {_names(gone)} lost; llama-server {ex.why}",
        )
    quick = ex.while_loading or obs.now - ex.started_at < cfg.stable_after_s
    failures = mem.failures + 1 if quick else 1
    return replace(
        mem,
        failures=failures,
        not_before=obs.now + backoff_s(cfg, failures),
        reason=f"llama-server {ex.why}",
    )


def _plan_start(cfg: PolicyConfig, mem: Memory, obs: Observation) -> tuple[Action, Memory]:
    if obs.now < mem.not_before:
        wait = mem.not_before - obs.now
        return Action(
            Do.WAIT, f"backing off after {mem.failures} failed starts: next in {wait:.1f} s"
        ), mem
    if mem.last_set is None or mem.take_ready:
        chosen = obs.ready
    else:
        kept = (mem.last_set - mem.lost) & obs.ready
        chosen = kept | (settled(mem, cfg, obs.now) & obs.ready)
    restart = mem.last_set is not None
    reason = mem.reason or ("restart" if restart else "start")
    if chosen and len(chosen) >= cfg.min_backends:
        action = Action(Do.START, reason, tuple(sorted(chosen)), restart)
    elif cfg.local_fallback:
        have = f"{len(chosen)} of {cfg.min_backends}" if chosen else "no"
        action = Action(
            Do.START,
            reason,
            (),
            restart,
            warning=f"{have} ready backends: serving on local devices alone until "
            f"{cfg.min_backends} are ready",
        )
    else:
        return Action(
            Do.WAIT,
            f"waiting for {cfg.min_backends} ready backends ({len(chosen)} ready); "
            "local fallback is off",
        ), mem
    used = frozenset(action.backends)
    # The ones we start with are held from now on: their readiness is no longer tracked.
    since = {e: t for e, t in mem.ready_since.items() if e not in used}
    return action, replace(
        mem, last_set=used, lost=frozenset(), reason=None, ready_since=since, take_ready=False
    )


def _watch(cfg: PolicyConfig, mem: Memory, obs: Observation, s: Serving) -> tuple[Action, Memory]:
    if s.lost:
        why = "; ".join(f"{e}: {how}" for e, how in sorted(s.lost.items()))
        reason = f"backend lost ({why})"
        lost = mem.lost | frozenset(s.lost)
        return Action(Do.STOP, reason), replace(mem, lost=lost, not_before=obs.now, reason=reason)
    if s.unhealthy_since is not None and obs.now - s.unhealthy_since >= cfg.unhealthy_after_s:
        reason = f"llama-server has not answered /health for {obs.now - s.unhealthy_since:.1f} s"
        failures = mem.failures + 1
        return Action(Do.STOP, reason), replace(
            mem,
            failures=failures,
            not_before=obs.now + backoff_s(cfg, failures),
            reason=reason,
        )
    if s.stalled_since is not None and obs.now - s.stalled_since >= cfg.stall_after_s:
        reason = (
            f"requests in flight made no progress for {obs.now - s.stalled_since:.1f} s: "
            "a backend in use stopped answering"
        )
        # Not llama-server's fault: no backoff. The silent backend will not probe ready.
        return Action(Do.STOP, reason), replace(mem, not_before=obs.now, reason=reason)
    if obs.requested is not None:
        return Action(Do.STOP, mem.reason or "restart requested", drain=True), mem
    if mem.failures and s.unhealthy_since is None and obs.now - s.started_at >= cfg.stable_after_s:
        mem = replace(mem, failures=0)
    newcomers = settled(mem, cfg, obs.now) - s.backends
    if not newcomers:
        return Action(Do.NOTHING), mem
    degraded = len(s.backends) < cfg.min_backends  # local fallback, or below the minimum
    if cfg.on_change is OnChange.IGNORE and not degraded:
        return Action(Do.NOTHING), mem
    if len(s.backends | newcomers) < cfg.min_backends:
        return Action(Do.NOTHING), mem
    reason = f"backend {_names(newcomers)} ready for {cfg.debounce_s:g} s: restart to include it"
    return Action(Do.STOP, reason, drain=True), replace(mem, reason=reason)


def decide(cfg: PolicyConfig, mem: Memory, obs: Observation) -> tuple[Action, Memory]:
    """What to do now, and the memory to pass to the next call."""
    mem = _track(mem, obs)
    if obs.exit is not None:
        mem = _after_exit(cfg, mem, obs, obs.exit)
    if obs.requested is not None:
        mem = replace(
            mem,
            take_ready=True,
            not_before=min(mem.not_before, obs.now),
            reason=f"restart requested: {obs.requested}",
        )
    if obs.serving is None:
        return _plan_start(cfg, mem, obs)
    return _watch(cfg, mem, obs, obs.serving)
