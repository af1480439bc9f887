#!/usr/bin/env python3
"""Benchmark: loading a large model over a 1 Gbit/s link, cold and warm, and failover with it.

Two network namespaces joined by a veth pair (tests/support/netns.py), both ends shaped to
1 Gbit/s with `tbf`; every address in 198.18.0.0/15, nothing leaves them:

    ns A  198.18.0.1   `corral coordinator run` (Corral's own path) and its llama-server
    ns B  198.18.0.2, 198.18.0.3   two `corral node`s, each running a real ggml-rpc-server with
                       its tensor cache on (the node's default) in its own directory

The model is the random-weight llama model scaled to --size (default 1 GiB), split 1:1 across
the two backends. Printed, with a target each:
  - cold load (empty caches) against the link's limit: bytes sent (veth tx counter) ÷ rate;
  - warm reload (caches filled by the cold load): how many times faster than cold;
  - failover: kill -9 one backend while serving; death -> next successful answer, once with
    half the model new to the survivor and once warm (the survivor has all of it cached);
  - plan error per device (needs the planner: `corral plan`, llama/buffers.py);
  - peak RSS of Corral's own processes (coordinator, nodes);
  - where the time goes: the same loads with the link unshaped;
  - past the loader's limit: the nodes fill their own caches first (`corral node --warm`, over
    their loopback), then a cold start of the coordinator against the same link's limit.
The kernel here has no `netem`, so the link's 0.2 ms delay cannot be added (the script tries and
prints tc's answer).

    sudo python3 benchmarks/model_load.py                # about 4 minutes
    sudo python3 benchmarks/model_load.py --size 2GiB --budget 1200

Bounded: the whole run is killed past --budget seconds; every process is stopped by PID (and
dies with its parent), the namespaces are deleted on any exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support.netns

import httpx
import psutil
from tests.support.netns import can_build_lan, isolated_lan

from corral.endpoint import Endpoint
from corral.llama.binaries import BinariesNotFound, find_binaries
from corral.llama.model_shape import parse_size, shape_for_size, tensor_bytes
from corral.llama.processes import parse_coordinator
from corral.llama.rpc_cache import measure, uses_cache
from corral.llama.supervisor import Child
from corral.llama.tiny_model import write_tiny_model
from corral.rpc.probe import Prober
from corral.types import Status
from support import until

COORD = "198.18.0.1"
BACKENDS = (Endpoint("198.18.0.2", 50052), Endpoint("198.18.0.3", 50052))
SERVE = Endpoint(COORD, 18080)
RATE_BIT_S = 1e9
TBF = ["tbf", "rate", "1gbit", "burst", "256kb", "latency", "20ms"]
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LOAD_S = 240.0  # one load may take this long before the run gives up
TARGET_COLD = 1.3  # × the link's limit
TARGET_WARM = 5.0  # × faster than cold
TARGET_FAILOVER_S = 10.0
TARGET_PLAN = 0.10


def corral_script() -> str:
    return str(Path(sys.executable).parent / "corral")


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)


def say(text: str) -> None:
    print(text, flush=True)


def split_weights(layers: int) -> tuple[int, int]:
    """Weights that give each of two devices half the layers. llama.cpp splits the layers and
    the output layer (layers + 1) by the weights' running sum, so 1:1 would give the first
    device one layer more than the second (2 layers: both on the first)."""
    first = layers // 2
    return first, layers - first + 1


# --- the part that runs inside ns A ---------------------------------------------------------


@dataclass
class Load:
    label: str
    seconds: float  # coordinator launched -> /health ok and a completion answered
    llama_seconds: float  # llama-server's own life until then
    tx_bytes: int  # sent on ns A's veth meanwhile


class Inner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.work = Path(args.work)
        self.model = Path(args.model)
        self.ns_b: str = args.ns_b
        self.veth_a: str = args.veth_a
        self.veth_b: str = args.veth_b
        self.weights = split_weights(int(args.layers))
        self.nodes: list[Child] = []
        self.coord: Child | None = None
        self.coord_runs = 0
        self.peak_kb: dict[str, int] = {}
        self.http = httpx.AsyncClient(timeout=30.0, trust_env=False)

    # ---- the link ----

    def shape(self, on: bool) -> None:
        for prefix, dev in ((["tc"], self.veth_a), (["tc", "-n", self.ns_b], self.veth_b)):
            if on:
                done = run([*prefix, "qdisc", "replace", "dev", dev, "root", *TBF])
                if done.returncode != 0:
                    raise RuntimeError(f"tc tbf on {dev}: {done.stderr.strip()}")
            else:
                run([*prefix, "qdisc", "del", "dev", dev, "root"])

    def try_delay(self) -> str:
        done = run(["tc", "qdisc", "add", "dev", self.veth_a, "root", "netem", "delay", "0.2ms"])
        if done.returncode == 0:
            run(["tc", "qdisc", "del", "dev", self.veth_a, "root"])
            return "netem works here (not used: tbf holds the root qdisc)"
        return done.stderr.strip() or f"tc exited {done.returncode}"

    def tx_bytes(self) -> int:
        return int(Path(f"/sys/class/net/{self.veth_a}/statistics/tx_bytes").read_text())

    # ---- processes ----

    async def start_nodes(self, warm: bool = False) -> None:
        """`warm`: each node loads the model into its own backend first (`corral node --warm`,
        over its loopback: nothing crosses the link); wait until both say so."""
        for i, ep in enumerate(BACKENDS):
            env = dict(os.environ)
            env["XDG_STATE_HOME"] = str(self.work / f"node{i}-state")
            env["LLAMA_CACHE"] = str(self.work / f"cache{i}")
            argv = ["ip", "netns", "exec", self.ns_b, corral_script(), "node",
                    "--host", ep.host, "--port", str(ep.port),
                    "--no-mdns", "--heartbeat", "1",
                    *(["--warm", str(self.model)] if warm else [])]  # fmt: skip
            log = self.work / f"node{i}{'-warm' if warm else ''}.log"
            child = Child(argv, log, env=env)
            await child.start()
            self.nodes.append(child)
        if warm:
            for i, node in enumerate(self.nodes):

                async def warmed(node: Child = node) -> bool:
                    tail = node.log_tail(50)
                    if "warming" in tail and "failed" in tail:
                        raise RuntimeError(f"node warm-up failed: {tail}")
                    return "cache warmed" in tail

                await until(warmed, LOAD_S, f"node {i} warmed")
        prober = Prober(timeout=1.0)
        for ep in BACKENDS:

            async def ready(ep: Endpoint = ep) -> bool:
                return (await prober.probe(ep)).status is Status.READY

            await until(ready, 20, f"{ep} ready")
        for i, _ in enumerate(BACKENDS):
            argv = psutil.Process(self.backend_pid(i)).cmdline()
            say(f"node {i}: ggml-rpc-server {'with' if uses_cache(argv) else 'WITHOUT'} -c")

    def backend_pid(self, i: int) -> int:
        pid = self.nodes[i].pid
        assert pid is not None
        for child in psutil.Process(pid).children():
            if child.name() == "ggml-rpc-server":
                return int(child.pid)
        raise RuntimeError(f"node {i} has no ggml-rpc-server: {self.nodes[i].log_tail()}")

    def cache_size(self, i: int) -> int:
        return measure(self.work / f"cache{i}" / "rpc").bytes

    def empty_caches(self) -> None:
        for i in range(len(BACKENDS)):
            for f in (self.work / f"cache{i}" / "rpc").glob("*"):
                f.unlink()

    async def start_coordinator(self) -> None:
        split = ",".join(f"{ep}={w}" for ep, w in zip(BACKENDS, self.weights, strict=True))
        argv = [corral_script(), "coordinator", "run", "--model", str(self.model),
                "--host", SERVE.host, "--port", str(SERVE.port),
                *[a for ep in BACKENDS for a in ("--backend", str(ep))],
                "--tensor-split", split, "--debounce", "3", "--probe-interval", "0.5",
                "--parallel", "1", "--ctx-size", "512"]  # fmt: skip
        env = dict(os.environ)
        env["XDG_STATE_HOME"] = str(self.work / "coord-state")
        self.coord_runs += 1
        self.coord = Child(argv, self.work / f"coordinator-{self.coord_runs}.log", env=env)
        await self.coord.start()

    async def stop_coordinator(self) -> None:
        if self.coord is None:
            return
        self.note_peak("coordinator", self.coord.pid)
        await self.coord.stop(grace=20)
        self.coord = None

    def note_peak(self, name: str, pid: int | None) -> None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kb = int(line.split()[1])
                    self.peak_kb[name] = max(self.peak_kb.get(name, 0), kb)
        except (OSError, ValueError):
            pass

    def llama_server(self) -> psutil.Process | None:
        if self.coord is None or self.coord.pid is None:
            return None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.coord.pid).children():
                if child.name() == "llama-server":
                    return child
        return None

    def serving_on(self) -> tuple[Endpoint, ...]:
        proc = self.llama_server()
        if proc is None:
            return ()
        try:
            return parse_coordinator(proc.pid, proc.cmdline(), proc.environ()).backends
        except psutil.Error:
            return ()

    async def answers(self) -> bool:
        try:
            reply = await self.http.post(f"http://{SERVE}/v1/chat/completions", json=BODY)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def healthy(self) -> bool:
        if self.coord is not None and self.coord.returncode is not None:
            raise RuntimeError(f"coordinator exited: {self.coord.log_tail()}")
        try:
            reply = await self.http.get(f"http://{SERVE}/health", timeout=1.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    # ---- measurements ----

    async def load(self, label: str) -> Load:
        tx0 = self.tx_bytes()
        start = time.monotonic()
        await self.start_coordinator()
        await until(self.healthy, LOAD_S, f"{label}: llama-server healthy", poll_s=0.02)
        ready_at = time.time()
        seconds = time.monotonic() - start
        proc = self.llama_server()
        llama_seconds = ready_at - proc.create_time() if proc is not None else float("nan")
        sent = self.tx_bytes() - tx0
        await until(self.answers, 30, f"{label}: a completion")
        limit = sent * 8 / RATE_BIT_S
        say(
            f"{label:<34} {seconds:6.2f} s (llama-server itself {llama_seconds:6.2f} s); "
            f"sent {sent / 1e9:.3f} GB, the link's limit for that {limit:.2f} s"
        )
        return Load(label, seconds, llama_seconds, sent)

    async def failover(self, label: str, victim: int) -> float:
        both = set(BACKENDS)
        await until(lambda: self._serving(both), LOAD_S, "serving on both backends")
        survivor = 1 - victim
        cached = self.cache_size(survivor)
        pid = self.backend_pid(victim)
        os.kill(pid, signal.SIGKILL)  # the rpc-server our node started, by its PID
        killed = time.monotonic()
        await until(self.answers, LOAD_S, f"{label}: an answer after the kill", poll_s=0.05)
        took = time.monotonic() - killed
        say(
            f"{label:<34} {took:6.2f} s from kill -9 to the next answer "
            f"(serving on {', '.join(map(str, self.serving_on())) or '?'}; "
            f"the survivor had {cached / 1e9:.2f} GB cached)"
        )
        return took

    async def _serving(self, backends: set[Endpoint]) -> bool:
        return set(self.serving_on()) == backends and await self.healthy()

    async def rejoin(self) -> float:
        start = time.monotonic()
        await until(lambda: self._serving(set(BACKENDS)), LOAD_S, "the killed backend back in use")
        await until(self.answers, 30, "a completion on both again")
        took = time.monotonic() - start
        say(f"{'rejoin (node restarts it, debounce 3 s)':<34} {took:6.2f} s")
        return took

    async def planned(self) -> dict[str, int] | None:
        """Bytes the planner (`corral plan`'s, coordinator/planning.py) gives each backend
        device for this model and split, from fresh probes; None without a planner."""
        try:
            from corral.coordinator.planning import Planner, planned_bytes
            from corral.llama.server import ServerOptions
            from corral.llama.split import parse_tensor_split
            from corral.models.plan import Shortfall, WhenShort
        except ImportError:
            return None
        prober = Prober(timeout=2.0)
        results = {ep: await prober.probe(ep) for ep in BACKENDS}
        split = ",".join(f"{ep}={w}" for ep, w in zip(BACKENDS, self.weights, strict=True))
        opts = ServerOptions(ctx_size=512, parallel=1, tensor_split=parse_tensor_split(split))
        plan = await Planner().plan(self.model, opts, BACKENDS, results, WhenShort.WAIT)
        if isinstance(plan, Shortfall):
            say(f"planner: {plan.reason}")
            return None
        return {f"{ref.backend_name} #{ref.device}": n for ref, n in planned_bytes(plan).items()}

    def used(self, log_from: int) -> dict[str, int]:
        """Bytes llama-server's log (-lv 4) says it took per device, from `log_from` on (the
        log is appended to across runs)."""
        from corral.llama.buffers import LOG_HEAD_BYTES, parse_buffers

        with self.llama_log().open("rb") as f:
            f.seek(log_from)
            text = f.read(LOG_HEAD_BYTES).decode(errors="replace")
        return {f"{r.backend_name} #{r.device}": b.total for r, b in parse_buffers(text).items()}

    def llama_log(self) -> Path:
        """Where the coordinator says its llama-server logs (its first output line)."""
        for path in sorted(self.work.glob("coordinator-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if "llama-server log: " in line:
                    return Path(line.split("llama-server log: ", 1)[1].strip())
        raise RuntimeError("the coordinator did not say where llama-server logs")

    def log_size(self) -> int:
        try:
            return self.llama_log().stat().st_size
        except (RuntimeError, OSError):
            return 0

    @staticmethod
    def plan_error(planned: dict[str, int] | None, used: dict[str, int]) -> dict[str, float]:
        """|planned − used| ÷ used for each backend device either names."""
        if planned is None:
            return {}
        out: dict[str, float] = {}
        for name in sorted(set(planned) | {n for n in used if not n.startswith("local")}):
            got = used.get(name, 0)
            out[name] = abs(planned.get(name, 0) - got) / got if got else float("inf")
        return out

    async def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"delay": self.try_delay()}
        self.shape(True)
        try:
            await self.start_nodes()
            planned = await self.planned()
            log_from = self.log_size()
            cold = await self.load("cold load (caches empty), shaped")
            used = self.used(log_from) if planned is not None else {}
            if planned is not None:
                say(f"{'':<34} planned {planned}; used {used} (bytes)")
            cached = [self.cache_size(i) for i in range(len(BACKENDS))]
            caches = ", ".join(f"{c / 1e9:.2f} GB" for c in cached)
            say(f"{'':<34} node caches after it: {caches} (split {self.weights})")
            await self.stop_coordinator()
            warm = await self.load("warm reload (caches full), shaped")
            half = await self.failover("failover, survivor half cached", victim=1)
            await self.rejoin()
            full = await self.failover("failover, survivor fully cached", victim=1)
            await self.stop_coordinator()
            out.update(cold=cold.__dict__, warm=warm.__dict__, failover=[half, full])
            out["plan_error"] = None if planned is None else self.plan_error(planned, used)

            self.shape(False)
            await until(lambda: self._restarted(1), 30, "node 1's backend back")
            self.empty_caches()
            ucold = await self.load("cold load (caches empty), unshaped")
            await self.stop_coordinator()
            uwarm = await self.load("warm reload, unshaped")
            await self.stop_coordinator()
            out.update(unshaped_cold=ucold.__dict__, unshaped_warm=uwarm.__dict__)
            for i, node in enumerate(self.nodes):
                self.note_peak(f"node {i}", node.pid)
            out["peak_kb"] = self.peak_kb

            # Past the loader's limit: the nodes load the model into their own backends first
            # (each has the model: a shared file here, the Hub over its own link in life), so
            # the coordinator's cold start sends a hash per large tensor.
            for node in self.nodes:
                await node.stop(grace=10)
            self.nodes = []
            self.empty_caches()
            self.shape(True)
            started = time.monotonic()
            await self.start_nodes(warm=True)
            warm_up = time.monotonic() - started
            say(f"{'nodes fill their caches (--warm)':<34} {warm_up:6.2f} s (over loopback)")
            pre = await self.load("cold start, nodes pre-warmed, shaped")
            await self.stop_coordinator()
            out.update(prewarmed=pre.__dict__, warm_up_s=warm_up)
        finally:
            await self.stop_coordinator()
            for node in self.nodes:
                await node.stop(grace=10)
            await self.http.aclose()
            self.shape(False)
        return out

    async def _restarted(self, i: int) -> bool:
        try:
            self.backend_pid(i)
        except RuntimeError:
            return False
        return (await Prober(timeout=1.0).probe(BACKENDS[i])).status is Status.READY


async def inner_main(args: argparse.Namespace) -> None:
    result = await Inner(args).run()
    print("RESULT " + json.dumps(result), flush=True)


# --- the part that builds the LAN and reports -------------------------------------------------


def report(result: dict[str, Any], model_bytes: int) -> int:
    say("")
    say(f"0.2 ms link delay: NOT applied: tc netem here says: {result['delay']!r}")
    say("  (this kernel has no netem qdisc; only the rate is shaped, with tbf on both ends)")
    cold, warm = result["cold"], result["warm"]
    limit = cold["tx_bytes"] * 8 / RATE_BIT_S
    ratio = cold["seconds"] / limit
    fails = 0

    def verdict(ok: bool) -> str:
        nonlocal fails
        fails += 0 if ok else 1
        return "meets" if ok else "MISSES"

    say(
        f"cold load: {cold['seconds']:.2f} s for {cold['tx_bytes'] / 1e9:.3f} GB sent "
        f"(model {model_bytes / 1e9:.3f} GB); link limit {limit:.2f} s; "
        f"{ratio:.2f}× the limit: target ≤ {TARGET_COLD}× {verdict(ratio <= TARGET_COLD)}"
    )
    speedup = cold["seconds"] / warm["seconds"]
    say(
        f"warm reload: {warm['seconds']:.2f} s, sent {warm['tx_bytes'] / 1e6:.1f} MB; "
        f"{speedup:.1f}× faster than cold: target ≥ {TARGET_WARM}× "
        f"{verdict(speedup >= TARGET_WARM)}"
    )
    half, full = result["failover"]
    say(
        f"failover: {full:.2f} s warm (survivor had every tensor cached): target ≤ "
        f"{TARGET_FAILOVER_S:g} s {verdict(full <= TARGET_FAILOVER_S)}; {half:.2f} s when half "
        "the model was new to the survivor"
    )
    plan = result["plan_error"]
    if plan is None:
        say("plan error: not measured (planner not present)")
    elif not plan:
        say("plan error: not measured (the planner found no plan)")
    else:
        worst = max(plan.values())
        each = ", ".join(f"{name} {err:.1%}" for name, err in plan.items())
        say(f"plan error: {each}: target ≤ {TARGET_PLAN:.0%} {verdict(worst <= TARGET_PLAN)}")
    peaks = ", ".join(f"{k} {v / 1024:.0f} MB" for k, v in result["peak_kb"].items())
    say(f"peak RSS of Corral's processes: {peaks}")
    pre = result.get("prewarmed")
    if pre is not None:
        full_limit = cold["tx_bytes"] * 8 / RATE_BIT_S
        say(
            f"cold start with the nodes pre-warmed (corral node --warm): {pre['seconds']:.2f} s,"
            f" sent {pre['tx_bytes'] / 1e6:.1f} MB; {pre['seconds'] / full_limit:.2f}× the link's"
            f" limit for the model ({full_limit:.2f} s): target ≤ {TARGET_COLD}× "
            f"{verdict(pre['seconds'] / full_limit <= TARGET_COLD)}; the nodes' own warm-up"
            f" {result['warm_up_s']:.2f} s, in parallel, over their loopback"
        )
    ucold, uwarm = result["unshaped_cold"], result["unshaped_warm"]
    say(
        f"where the time goes: unshaped cold {ucold['seconds']:.2f} s "
        f"({ucold['tx_bytes'] * 8 / ucold['seconds'] / 1e9:.2f} Gbit/s achieved), "
        f"unshaped warm {uwarm['seconds']:.2f} s; "
        f"shaped cold minus the link's limit {cold['seconds'] - limit:.2f} s"
    )
    say(
        "  coordinator start -> llama-server start: "
        f"{cold['seconds'] - cold['llama_seconds']:.2f} s cold, "
        f"{warm['seconds'] - warm['llama_seconds']:.2f} s warm"
    )
    return 0 if fails == 0 else 1


async def outer_main(args: argparse.Namespace) -> int:
    reason = can_build_lan()
    if reason:
        say(f"cannot run: {reason}")
        return 2
    try:
        find_binaries()
    except BinariesNotFound as exc:
        say(f"cannot run: {exc}")
        return 2
    size = parse_size(args.size)
    if size < 1024**3 and not args.allow_small:
        say("--size: the benchmark wants at least 1 GiB (or --allow-small)")
        return 2
    with tempfile.TemporaryDirectory(prefix="corral-bench-load-") as tmp:
        work = Path(tmp)
        shape = shape_for_size(size)
        started = time.monotonic()
        model = await asyncio.to_thread(write_tiny_model, work / "model.gguf", seed=0, shape=shape)
        model_bytes = tensor_bytes(shape)
        say(
            f"model: {model_bytes / 1e9:.3f} GB of F32 tensors ({shape.layers} layers, "
            f"{shape.embd} wide, ff {shape.ff}), written in {time.monotonic() - started:.1f} s"
        )
        with isolated_lan(a_addresses=(f"{COORD}/24",)) as lan:
            for ep in BACKENDS:
                lan.add_address(lan.ns_b, f"{ep.host}/24")
            argv = lan.exec_argv(lan.ns_a, [sys.executable, __file__, "--inner",
                   "--work", str(work), "--model", str(model), "--ns-b", lan.ns_b,
                   "--veth-a", lan.veth_a, "--veth-b", lan.veth_b,
                   "--layers", str(shape.layers)])  # fmt: skip
            child = Child(argv, work / "inner.log")
            await child.start()
            assert child.process is not None
            result = await _follow(child, work / "inner.log", args.budget)
    if result is None:
        return 1
    return report(result, model_bytes)


async def _follow(child: Child, log: Path, budget: float) -> dict[str, Any] | None:
    """Print the inner run's lines as they come; its RESULT line at the end (or None)."""
    assert child.process is not None
    deadline = time.monotonic() + budget
    shown = 0
    result: dict[str, Any] | None = None
    try:
        while True:
            done = child.process.returncode is not None
            text = await asyncio.to_thread(log.read_text, errors="replace")
            lines = text.splitlines()
            for line in lines[shown:]:
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
                else:
                    say(line)
            shown = len(lines)
            if done:
                break
            if time.monotonic() > deadline:
                say(f"budget of {budget:g} s spent: stopping")
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.process.wait(), 0.5)
    finally:
        await child.stop(grace=30)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="model size (default 1GiB)")
    parser.add_argument("--allow-small", action="store_true", help="allow a model under 1 GiB")
    parser.add_argument("--budget", type=float, default=900, help="seconds for the whole run")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    for name in ("--work", "--model", "--ns-b", "--veth-a", "--veth-b", "--layers"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        asyncio.run(inner_main(args))
        return 0
    return asyncio.run(outer_main(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
