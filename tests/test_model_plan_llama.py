"""The memory plan against the real thing: llama-server's own buffer sizes (`-lv 4`), the -ngl
behaviour Corral's choice rests on, `corral plan` as a subprocess, and the coordinator's
`--when-short wait|cpu` with real backends.

"This backend has little memory" cannot be caused with a real ggml-rpc-server (its CPU device
reports the machine's RAM; no option caps it), so for that one fact a backend sits behind
tests/support/memory_proxy.py, which rewrites only the GET_DEVICE_MEMORY reply and passes every
other byte to and from the real server.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from corral.coordinator.planning import backend_devices, host_memory, planned_options
from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.buffers import HOST, parse_buffers
from corral.llama.server import ServerOptions, server_argv, server_env
from corral.llama.supervisor import Child
from corral.models.gguf_info import ModelInfo, read_model_info
from corral.models.plan import MIB, Plan, PlanRequest, WhenShort, make_plan
from corral.rpc.probe import Prober
from corral.types import CoordinatorState, DeviceRef, ProbeResult, Status
from tests.support.coordinator import running
from tests.support.corral_cli import corral
from tests.support.llama_server import http_status
from tests.support.loopback import free_port
from tests.support.memory_proxy import memory_proxy
from tests.support.plan_models import Shape, write_model
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

# About 200 MB of f16 weights: 8 layers of 21.5 MiB, grouped-query attention (4 KV heads).
BIG = Shape(layers=8, embd=1024, heads=16, kv_heads=4, ff=2816, vocab=8000, ctx=4096)
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("big") / "big.gguf", BIG)


async def _probe(eps: list[Endpoint]) -> dict[Endpoint, ProbeResult]:
    prober = Prober(timeout=2.0)
    results = await asyncio.gather(*(prober.probe(e) for e in eps))
    assert all(r.status is Status.READY for r in results), results
    return {r.endpoint: r for r in results}


async def _serve_log(
    bins: LlamaBinaries, model: Path, opts: ServerOptions, eps: list[Endpoint], log: Path
) -> str:
    """Run llama-server with these options until /health is ready; its log."""
    port = free_port("127.0.0.1")
    argv = server_argv(bins.llama_server, model, replace(opts, port=port), eps)
    if "-lv" not in argv:
        argv += ["-lv", "4"]
    child = Child([*argv, "-t", "1"], log, env=server_env(os.environ))
    await child.start()
    try:

        async def ready() -> bool:
            if child.returncode is not None:
                raise AssertionError(f"llama-server exited {child.returncode}: {child.log_tail()}")
            return await http_status(Endpoint("127.0.0.1", port), "/health") == 200

        await until(ready, 60, "llama-server ready")
    finally:
        await child.stop(grace=5)
    return await asyncio.to_thread(log.read_text, errors="replace")


async def _plan_and_run(
    bins: LlamaBinaries, model: Path, eps: list[Endpoint], tmp: Path, ctx: int
) -> tuple[Plan, str]:
    info = read_model_info(model)
    results = await _probe(eps)
    plan = make_plan(info, backend_devices(eps, results), host_memory(), PlanRequest(ctx_size=ctx))
    assert isinstance(plan, Plan), plan
    opts = planned_options(ServerOptions(parallel=1), plan)
    return plan, await _serve_log(bins, model, opts, eps, tmp / "llama.log")


def _check_against_log(plan: Plan, info: ModelInfo, log: str) -> None:
    used = parse_buffers(log)
    offloaded = _OFFLOADED.search(log)
    assert offloaded and int(offloaded[1]) == plan.gpu_layers, offloaded
    assert int(offloaded[2]) == info.n_layer + 1
    for d in plan.backends:
        assert d.device.backend is not None
        got = used.get(DeviceRef(d.device.backend, str(d.device.index)))
        assert got is not None, (d.device.name, used)
        assert abs(got.model - d.weights) <= 0.10 * got.model, (d.device.name, got, d)
        assert abs(got.kv - d.kv) <= 0.01 * got.kv + 16 * 1024, (d.device.name, got, d)
        # An estimate with a margin: never below what llama.cpp reserved, never far above
        # (with part of the model on the host it is up to 2.6x high; see models/plan.py).
        assert got.compute <= d.compute <= 3 * got.compute + 4 * MIB, (d.device.name, got, d)
    host = used[DeviceRef(None, HOST)]
    assert host.compute <= plan.host.compute <= 3 * host.compute + 4 * MIB, (host, plan.host)


async def test_the_plan_matches_llama_servers_buffers_for_the_tiny_model(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    eps = [(await rpc_server())[0], (await rpc_server())[0]]
    plan, log = await _plan_and_run(llama_bins, tiny_model, eps, tmp_path, 512)
    _check_against_log(plan, read_model_info(tiny_model), log)


async def test_the_plan_matches_llama_servers_buffers_for_a_bigger_model(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    eps = [(await rpc_server())[0], (await rpc_server())[0]]
    plan, log = await _plan_and_run(llama_bins, big_model, eps, tmp_path, 2048)
    assert [d.layers for d in plan.backends] == [5, 3] and plan.backends[1].output
    _check_against_log(plan, read_model_info(big_model), log)


async def test_an_explicit_ngl_switches_llama_servers_own_fitting_off(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    """Why Corral passes the plan's -ngl: with it, `--fit` (on by default) gives up, so what
    runs is what was planned. A fit target above the backends' free memory makes fitting
    want fewer layers; only the run without -ngl gets them."""
    eps = [(await rpc_server())[0], (await rpc_server())[0]]
    results = await _probe(eps)
    free_mib = min(d.free_bytes for r in results.values() for d in r.devices) // MIB
    target = ["-fitt", str(free_mib - 100)]  # leave less than 100 MiB to the model
    fixed = ServerOptions(ctx_size=2048, parallel=1, extra_args=tuple(target))
    log = await _serve_log(llama_bins, big_model, fixed, eps, tmp_path / "ngl.log")
    assert "n_gpu_layers already set by user to 99, abort" in log
    assert (m := _OFFLOADED.search(log)) and m[1] == m[2] == str(BIG.layers + 1)
    unset = replace(fixed, extra_args=(*target, "-ngl", "auto"))
    log = await _serve_log(llama_bins, big_model, unset, eps, tmp_path / "auto.log")
    assert (m := _OFFLOADED.search(log)) and int(m[1]) < int(m[2]), m


async def test_corral_plan_exits_1_with_the_sentence_when_short_and_0_when_it_fits(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path
) -> None:
    real, _ = await rpc_server()
    env = dict(os.environ)
    async with memory_proxy(real, free=64 * MIB, total=64 * MIB) as small:
        run = await corral("plan", "--model", str(big_model), "--backend", str(small.endpoint),
                           "--ctx-size", "2048", env=env)  # fmt: skip
        assert run.code == 1, run
        sentence = " ".join(run.err.split())
        assert "the model needs " in sentence and "the 1 ready backend has " in sentence, run
        assert re.search(r"\d+\.\d (MiB|GiB) short", sentence), run
        assert small.rewritten >= 1
    run = await corral("plan", "--model", str(big_model), "--backend", str(real), "--json",
                       "--ctx-size", "2048", env=env)  # fmt: skip
    assert run.code == 0, run
    assert '"fits": true' in run.out and f'"backend": "{real}"' in run.out


async def test_when_short_wait_waits_with_the_reason_then_starts_once_memory_is_there(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    real, _ = await rpc_server()
    async with (
        memory_proxy(real, free=64 * MIB, total=64 * MIB) as small,
        running(
            tmp_path,
            llama_bins,
            big_model,
            [small.endpoint],
            tensor_split=None,
            when_short=WhenShort.WAIT,
            local_fallback=False,
        ) as c,  # fmt: skip
    ):

        async def waiting_short() -> bool:
            r = await c.store.coordinator()
            return (
                r is not None
                and r.state is CoordinatorState.WAITING
                and "short" in (r.last_reason or "")
            )

        await until(waiting_short, 20, "waiting, with the shortfall as reason")
        await c.looks_pass(5)
        assert await c.pids() == set() and c.runner.server is None
        small.free = small.total = 8 * 1024 * MIB  # the backend now has the memory
        await c.wait_serving([small.endpoint], seconds=60)
        plan = c.runner.plan
        assert plan is not None and plan.gpu_layers == BIG.layers + 1
        log_path = tmp_path / f"llama-server-{c.runner.opts.port}.log"
        log = await asyncio.to_thread(log_path.read_text, errors="replace")
        assert f"offloaded {BIG.layers + 1}/{BIG.layers + 1} layers" in log


async def test_when_short_cpu_serves_with_the_first_layers_on_this_host(
    llama_bins: LlamaBinaries, rpc_server: StartRpc, big_model: Path, tmp_path: Path
) -> None:
    real, _ = await rpc_server()
    info = read_model_info(big_model)
    room = info.weight_bytes // 2  # about half the layers fit
    async with (
        memory_proxy(real, free=room, total=room) as small,
        running(
            tmp_path,
            llama_bins,
            big_model,
            [small.endpoint],
            tensor_split=None,
            when_short=WhenShort.CPU,
            local_fallback=False,
        ) as c,  # fmt: skip
    ):
        await c.wait_serving([small.endpoint], seconds=60)
        plan = c.runner.plan
        assert plan is not None and 0 < plan.gpu_layers < info.n_layer + 1
        assert all(d.fits for d in plan.devices)
        log_path = tmp_path / f"llama-server-{c.runner.opts.port}.log"
        log = await asyncio.to_thread(log_path.read_text, errors="replace")
        assert f"offloaded {plan.gpu_layers}/{info.n_layer + 1} layers" in log
        _check_against_log(plan, info, log)
