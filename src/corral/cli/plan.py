"""`corral plan`: would the model fit the ready backends, and how would it be laid out?

The same plan the coordinator makes before every start (corral.models.plan): probe the backends
given (else the ones the store last saw ready and not in use), read the model's shape, and show
each device's need against its free memory. Exit 0 when it fits, 1 with one sentence when not,
2 on bad input.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from corral.cli.console import bad_input, fail, stdout, warnings
from corral.cli.model_ref import fetch_with_bar, model_option
from corral.cli.options import (
    BackendOpt,
    CtxSizeOpt,
    GpuLayersOpt,
    JsonOpt,
    ModelRefOpt,
    ParallelOpt,
    RedisOpt,
    TensorSplitOpt,
    TimeoutOpt,
    WhenShortOpt,
    check_timeout,
)

if TYPE_CHECKING:
    from corral.endpoint import Endpoint
    from corral.models.plan import DevicePlan, Plan
    from corral.types import ProbeResult


def plan(
    model: ModelRefOpt = None,
    ctx_size: CtxSizeOpt = None,
    parallel: ParallelOpt = None,
    gpu_layers: GpuLayersOpt = 99,
    backend: BackendOpt = None,
    tensor_split: TensorSplitOpt = None,
    when_short: WhenShortOpt = "wait",
    timeout: TimeoutOpt = 1.0,
    redis: RedisOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Plan the model's memory over the ready backends: need vs free per device."""
    import asyncio

    from corral.coordinator.planning import backend_devices, host_memory, plan_request
    from corral.coordinator.settings import parse_backends
    from corral.llama.server import ServerOptions
    from corral.llama.split import parse_tensor_split
    from corral.models.gguf_info import read_model_info
    from corral.models.plan import Shortfall, WhenShort, make_plan
    from corral.store.errors import StateFileError
    from corral.types import Status

    check_timeout(timeout)
    if model is None:
        bad_input("no model: give --model PATH or set CORRAL_MODEL")
    # A reference is fetched first (into the shared cache `corral up` then reuses): the plan
    # reads the model's header and tensor table, which are in its first part.
    local, fetch = model_option(model)
    model = local if fetch is None else fetch_with_bar(fetch)
    assert model is not None
    try:
        given = parse_backends(backend or [])
        split = parse_tensor_split(tensor_split)
    except ValueError as exc:
        bad_input(str(exc))
    try:
        info = read_model_info(model)
    except (OSError, ValueError) as exc:
        bad_input(f"--model {model}: {exc}")
    try:
        results, notes = asyncio.run(_probe(given, timeout, redis))
    except StateFileError as exc:
        fail(str(exc))
    except ValueError as exc:  # a bad --redis URL
        bad_input(str(exc))
    ready = [ep for ep, r in results.items() if r.status is Status.READY]
    notes += [
        f"backend {ep} is {r.status}{f': {r.error}' if r.error else ''}; not in the plan"
        for ep, r in results.items()
        if r.status is not Status.READY
    ]
    warnings(notes)
    devices = backend_devices(ready, results)
    counts: dict[Endpoint, int] = {}
    for d in devices:
        if d.backend is not None:
            counts[d.backend] = counts.get(d.backend, 0) + 1
    opts = ServerOptions(
        ctx_size=ctx_size, parallel=parallel, gpu_layers=gpu_layers, tensor_split=split
    )
    request = plan_request(opts, ready, counts, WhenShort(when_short))
    made = make_plan(info, devices, host_memory(), request)
    if isinstance(made, Shortfall):
        if json_out:
            print(json.dumps(_shortfall_json(made.reason, made.need, made.free), indent=2))
            raise SystemExit(1)
        fail(made.reason)
    if json_out:
        print(json.dumps(_plan_json(made), indent=2))
        return
    _print_plan(made, str(model))


async def _probe(
    given: tuple[Endpoint, ...], probe_s: float, redis_url: str | None
) -> tuple[dict[Endpoint, ProbeResult], list[str]]:
    """Fresh probes of `given`, else of the backends the store last saw ready and not held."""
    import asyncio

    from corral.llama.probing import installed_prober
    from corral.net.identity import identities, one_per_backend
    from corral.paths import state_dir
    from corral.store.factory import open_store
    from corral.types import Status

    notes: list[str] = []
    endpoints = list(given)
    if not endpoints:
        store = await open_store(redis_url, state_dir())
        try:
            records = await store.backends()
            notes += store.take_warnings()
        finally:
            await store.close()
        endpoints = [r.endpoint for r in records if r.status is Status.READY and not r.in_use]
        held = [r.endpoint for r in records if r.in_use]
        notes += [f"backend {ep} is in use by a coordinator; not probed" for ep in held]
        if not endpoints:
            notes.append("the store knows no ready backend: planning for this host alone")
    # One probe per backend however many names it has: one client at a time (see facts).
    endpoints = one_per_backend(endpoints, await identities(endpoints))
    prober = installed_prober(probe_s)
    found = await asyncio.gather(*(prober.probe(e) for e in endpoints))
    return {r.endpoint: r for r in found}, notes


def _device_json(d: DevicePlan) -> dict[str, Any]:
    return {
        "device": d.device.name,
        "backend": None if d.device.backend is None else str(d.device.backend),
        "index": d.device.index,
        "layers": d.layers,
        "output": d.output,
        "weights_bytes": d.weights,
        "kv_bytes": d.kv,
        "compute_bytes": d.compute,
        "need_bytes": d.need,
        "free_bytes": d.device.free,
        "reserve_bytes": d.device.reserve,
        "fits": d.fits,
    }


def _plan_json(p: Plan) -> dict[str, Any]:
    return {
        "fits": True,
        "reason": None,
        "ctx_size": p.ctx,
        "gpu_layers": p.gpu_layers,
        "tensor_split": p.tensor_split,
        "user_split": p.user_split,
        "devices": [_device_json(d) for d in p.devices],
    }


def _shortfall_json(reason: str, need: int, free: int) -> dict[str, Any]:
    return {"fits": False, "reason": reason, "need_bytes": need, "free_bytes": free}


def _print_plan(p: Plan, model: str) -> None:
    from rich import box
    from rich.table import Table

    from corral.cli.console import escape
    from corral.cli.render import human_bytes

    names = [d.device.name for d in p.devices]
    table = Table(
        title=escape(f"Memory plan for {model} (context {p.ctx})"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("device", no_wrap=True, min_width=len(max(names, key=len, default="")))
    for col in ("layers", "weights", "KV", "compute", "need", "free"):
        table.add_column(col, no_wrap=True, justify="right")
    for d in p.devices:
        table.add_row(
            escape(d.device.name),
            f"{d.layers}{'+out' if d.output else ''}",
            human_bytes(d.weights),
            human_bytes(d.kv),
            human_bytes(d.compute),
            f"[{'green' if d.fits else 'red'}]{human_bytes(d.need)}[/]",
            human_bytes(d.device.free),
        )
    console = stdout()
    console.print(table)
    args = [f"-c {p.ctx}"]
    if p.backends:
        args.append(f"-ngl {p.gpu_layers}")
    if p.tensor_split:
        args.append(f"--tensor-split {p.tensor_split}")
    console.print(f"llama-server gets: {escape(' '.join(args))}", soft_wrap=True)
    console.print(
        "A device fits (need in green) when its need leaves 5 % of its total (at most 1 GiB)"
        " free; compute is an estimate with a 10 % margin.",
        soft_wrap=True,
    )
