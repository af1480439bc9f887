"""The coordinator's decisions, rule by rule, with plain values (policy.py is pure)."""

from __future__ import annotations

from corral.coordinator.policy import (
    Action,
    Do,
    Exit,
    Memory,
    Observation,
    OnChange,
    PolicyConfig,
    Serving,
    backoff_s,
    decide,
)
from corral.endpoint import Endpoint

A = Endpoint("10.0.0.1", 50052)
B = Endpoint("10.0.0.2", 50052)
C = Endpoint("10.0.0.3", 50052)
CFG = PolicyConfig(
    debounce_s=10.0,
    stable_after_s=30.0,
    backoff_base_s=1.0,
    backoff_max_s=8.0,
    unhealthy_after_s=5.0,
)


def ready(*eps: Endpoint) -> frozenset[Endpoint]:
    return frozenset(eps)


def serving(*eps: Endpoint, started: float = 0.0, **kw: object) -> Serving:
    return Serving(frozenset(eps), started, **kw)  # type: ignore[arg-type]


def step(
    mem: Memory, now: float, r: frozenset[Endpoint], s: Serving | None = None, **kw: object
) -> tuple[Action, Memory]:
    return decide(CFG, mem, Observation(now, r, s, **kw))  # type: ignore[arg-type]


def test_first_start_uses_every_ready_backend_sorted() -> None:
    action, mem = step(Memory(), 0.0, ready(B, A))
    assert action == Action(Do.START, "start", (A, B), restart=False)
    assert mem.last_set == frozenset({A, B})
    assert mem.ready_since == {}  # held from now on: not tracked


def test_no_backend_local_fallback_warns() -> None:
    action, mem = step(Memory(), 0.0, ready())
    assert action.do is Do.START and action.backends == ()
    assert action.warning and "local devices alone" in action.warning
    assert mem.last_set == frozenset()


def test_no_backend_without_fallback_waits() -> None:
    cfg = PolicyConfig(local_fallback=False, min_backends=2)
    action, mem = decide(cfg, Memory(), Observation(0.0, ready(A)))
    assert action.do is Do.WAIT
    assert "waiting for 2 ready backends (1 ready)" in action.reason
    assert mem.last_set is None


def test_min_backends_below_minimum_falls_back_to_local() -> None:
    cfg = PolicyConfig(min_backends=2)
    action, _ = decide(cfg, Memory(), Observation(0.0, ready(A)))
    assert action.do is Do.START and action.backends == ()
    assert action.warning and "1 of 2" in action.warning


def test_lost_backend_stops_at_once_without_drain() -> None:
    _, mem = step(Memory(), 0.0, ready(A, B))
    action, mem = step(mem, 5.0, ready(), serving(A, B, lost={B: "closed"}))
    assert action.do is Do.STOP and not action.drain
    assert "10.0.0.2:50052: closed" in action.reason
    assert mem.lost == {B}


def test_after_failover_restart_keeps_survivor_only() -> None:
    _, mem = step(Memory(), 0.0, ready(A, B))
    _, mem = step(mem, 5.0, ready(), serving(A, B, lost={B: "closed"}))
    # B already answers again when we probe after the stop: it still needs the debounce.
    action, mem = step(mem, 5.1, ready(A, B))
    assert action.do is Do.START and action.restart
    assert action.backends == (A,)
    assert "backend lost" in action.reason
    assert mem.ready_since == {B: 5.1}


def test_returning_backend_joins_after_debounce_with_drain() -> None:
    mem = Memory(last_set=ready(A))
    s = serving(A)
    action, mem = step(mem, 100.0, ready(B), s)
    assert action.do is Do.NOTHING
    action, mem = step(mem, 109.9, ready(B), s)
    assert action.do is Do.NOTHING
    action, mem = step(mem, 110.0, ready(B), s)
    assert action.do is Do.STOP and action.drain
    assert "ready for 10 s" in action.reason
    action, mem = step(mem, 110.5, ready(A, B))
    assert action.do is Do.START and action.backends == (A, B) and action.restart


def test_flapping_backend_restarts_the_debounce_each_time() -> None:
    mem = Memory(last_set=ready(A))
    s = serving(A)
    now = 0.0
    for _ in range(5):  # up 3 s, down 1 s: never 10 s in a row
        for _ in range(3):
            action, mem = step(mem, now, ready(B), s)
            assert action.do is Do.NOTHING
            now += 1.0
        action, mem = step(mem, now, ready(), s)
        assert action.do is Do.NOTHING
        now += 1.0
    back = now
    while True:  # then it stays up: one stop, a full debounce after it came back
        action, mem = step(mem, now, ready(B), s)
        if action.do is not Do.NOTHING:
            break
        now += 1.0
    assert action.do is Do.STOP and now - back == 10.0


def test_on_change_ignore_keeps_serving_but_still_fails_over() -> None:
    cfg = PolicyConfig(debounce_s=1.0, on_change=OnChange.IGNORE)
    mem = Memory(last_set=ready(A))
    _, mem = decide(cfg, mem, Observation(0.0, ready(B), serving(A)))
    action, mem = decide(cfg, mem, Observation(5.0, ready(B), serving(A)))
    assert action.do is Do.NOTHING
    action, _ = decide(cfg, mem, Observation(6.0, ready(B), serving(A, lost={A: "gone"})))
    assert action.do is Do.STOP


def test_local_fallback_always_moves_to_backends_even_with_ignore() -> None:
    cfg = PolicyConfig(debounce_s=1.0, on_change=OnChange.IGNORE)
    mem = Memory(last_set=frozenset())
    _, mem = decide(cfg, mem, Observation(0.0, ready(A), serving()))
    action, _ = decide(cfg, mem, Observation(1.0, ready(A), serving()))
    assert action.do is Do.STOP and action.drain


def test_newcomers_below_minimum_do_not_restart() -> None:
    cfg = PolicyConfig(debounce_s=1.0, min_backends=3)
    mem = Memory(last_set=frozenset())
    _, mem = decide(cfg, mem, Observation(0.0, ready(A, B), serving()))
    action, _ = decide(cfg, mem, Observation(2.0, ready(A, B), serving()))
    assert action.do is Do.NOTHING
    _, mem = decide(cfg, mem, Observation(2.0, ready(A, B, C), serving()))
    action, _ = decide(cfg, mem, Observation(3.0, ready(A, B, C), serving()))
    assert action.do is Do.STOP


def test_exit_caused_by_a_lost_backend_restarts_at_once_without_it() -> None:
    mem = Memory(last_set=ready(A, B), failures=3)
    ex = Exit(ready(A, B), 0.0, "killed by SIGABRT")
    action, mem = step(mem, 1.0, ready(A), exit=ex)
    assert action.do is Do.START and action.backends == (A,)
    assert "backend 10.0.0.2:50052 lost" in action.reason
    assert mem.failures == 3  # not llama-server's fault: no backoff


def test_crash_loop_backs_off_exponentially_and_forgives_after_stable_run() -> None:
    assert [backoff_s(CFG, n) for n in range(1, 7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    mem = Memory(last_set=ready(A))
    now = 0.0
    waits = []
    for _ in range(4):
        ex = Exit(ready(A), now, "exited with status 1", while_loading=True)
        action, mem = step(mem, now, ready(A), exit=ex)
        if action.do is Do.WAIT:
            waits.append(round(mem.not_before - now, 3))
            assert "backing off after" in action.reason
            now = mem.not_before
            action, mem = step(mem, now, ready(A))
        assert action.do is Do.START
    assert waits == [1.0, 2.0, 4.0]
    # A long healthy run resets the count: the next crash restarts at once.
    action, mem = step(mem, now + 31.0, ready(), serving(A, started=now))
    assert action.do is Do.NOTHING and mem.failures == 0


def test_quick_exit_after_long_run_counts_as_one() -> None:
    mem = Memory(last_set=ready(A), failures=4)
    ex = Exit(ready(A), 0.0, "exited with status 1")
    action, mem = step(mem, 100.0, ready(A), exit=ex)
    assert action.do is Do.START and mem.failures == 1


def test_unanswered_health_is_a_failover() -> None:
    mem = Memory(last_set=ready(A))
    action, _ = step(mem, 4.9, ready(), serving(A, unhealthy_since=0.0))
    assert action.do is Do.NOTHING
    action, mem = step(mem, 5.0, ready(), serving(A, unhealthy_since=0.0))
    assert action.do is Do.STOP and not action.drain and "/health" in action.reason
    assert mem.failures == 1


def test_ready_tracking_never_includes_held_backends() -> None:
    mem = Memory(last_set=ready(A))
    _, mem = step(mem, 0.0, ready(A, B), serving(A))
    assert set(mem.ready_since) == {B}


def test_requests_without_progress_are_a_failover_without_backoff() -> None:
    cfg = PolicyConfig(stall_after_s=30.0)
    mem = Memory(last_set=ready(A, B), failures=2)
    action, _ = decide(cfg, mem, Observation(29.0, ready(), serving(A, B, stalled_since=0.0)))
    assert action.do is Do.NOTHING
    action, mem = decide(cfg, mem, Observation(30.0, ready(), serving(A, B, stalled_since=0.0)))
    assert action.do is Do.STOP and not action.drain and "no progress" in action.reason
    assert mem.failures == 2 and mem.not_before == 30.0
    # The silent backend does not probe ready: the restart goes on without it.
    action, _ = decide(cfg, mem, Observation(31.0, ready(A)))
    assert action.do is Do.START and action.backends == (A,)
