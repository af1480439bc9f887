"""The memory plan before every start: the model's shape, the devices' free memory, the plan,
and the llama-server options that carry it out.

The devices are what the runner's last probe round saw of each ready backend (free and total
memory per device index) plus this host's available RAM (psutil); the model's shape is read
once per file version (size and mtime), in a thread.

Why the plan's -ngl and --tensor-split are passed explicitly: llama-server's own `--fit on`
(the default) adjusts only the arguments not given, and an explicit `-ngl` switches it off
(seen with `-lv 4`: "failed to fit params to free device memory: n_gpu_layers already set by
user to 99, abort", then every layer offloaded even where its fit target said no). Corral has
always passed `-ngl 99`, so llama-server never fitted anything under it. Leaving -ngl out would
let llama-server fit, but over RPC it asks each backend for free memory while loading and
decides alone, and the coordinator could not tell beforehand whether the start will fail; the
plan knows the whole set, keeps named weights, and is published. So the plan's numbers go on
the command line, and `-c` too, so that the context planned is the context used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from corral.endpoint import Endpoint
from corral.llama.buffers import HOST
from corral.llama.server import ServerOptions
from corral.llama.split import TensorSplit
from corral.models.gguf_info import ModelInfo, read_model_info
from corral.models.plan import (
    DeviceMemory,
    Plan,
    PlanRequest,
    Shortfall,
    WhenShort,
    make_plan,
)
from corral.types import DeviceRef, ProbeResult, Status


def backend_devices(
    backends: Sequence[Endpoint], results: Mapping[Endpoint, ProbeResult]
) -> list[DeviceMemory]:
    """Every device of the --rpc set, in llama-server's order (backend, then device index).

    A backend without a ready probe result counts as having no device memory at all: the plan
    then says it is short rather than guessing.
    """
    out: list[DeviceMemory] = []
    for ep in backends:
        result = results.get(ep)
        devices = result.devices if result and result.status is Status.READY else ()
        if not devices:
            out.append(DeviceMemory(ep, 0, 0, 0))
        for d in sorted(devices, key=lambda d: d.index):
            out.append(DeviceMemory(ep, d.index, d.free_bytes, d.total_bytes))
    return out


def host_memory() -> DeviceMemory:
    """This host's RAM as llama-server's CPU device would have it: what is available now."""
    import psutil

    vm = psutil.virtual_memory()
    return DeviceMemory(None, 0, int(vm.available), int(vm.total))


def plan_request(
    opts: ServerOptions,
    backends: Sequence[Endpoint],
    device_counts: Mapping[Endpoint, int],
    when_short: WhenShort,
) -> PlanRequest:
    split = opts.tensor_split
    return PlanRequest(
        ctx_size=opts.ctx_size,
        parallel=opts.parallel,
        gpu_layers=opts.gpu_layers,
        tensor_split=split.text if split else None,
        split_argument=split.argument(backends, device_counts) if split else None,
        when_short=when_short,
    )


def planned_options(opts: ServerOptions, plan: Plan) -> ServerOptions:
    """The options that carry out `plan` (with no backend, llama-server's local devices keep
    the user's -ngl: the plan only checked this host's memory)."""
    if not plan.backends:
        return replace(opts, ctx_size=plan.ctx)
    split = opts.tensor_split if plan.user_split else None
    if not plan.user_split and plan.tensor_split is not None:
        split = TensorSplit(plan.tensor_split)
    return replace(opts, ctx_size=plan.ctx, gpu_layers=plan.gpu_layers, tensor_split=split)


def planned_bytes(plan: Plan) -> dict[DeviceRef, int]:
    """Bytes planned per device, named as llama/buffers.py names what the log says was used."""
    out = {DeviceRef(None, HOST): plan.host.need}
    for d in plan.backends:
        if d.device.backend is not None and d.need:
            out[DeviceRef(d.device.backend, str(d.device.index))] = d.need
    return out


@dataclass
class Planner:
    """Reads the model (cached per file version) and plans; the I/O goes to threads."""

    _cached: tuple[tuple[str, int, int], ModelInfo] | None = field(default=None, init=False)

    async def model(self, path: Path) -> ModelInfo:
        """Raises ModelInfoError (a ValueError) or OSError."""
        st = await asyncio.to_thread(path.stat)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        info = await asyncio.to_thread(read_model_info, path)
        self._cached = (key, info)
        return info

    async def plan(
        self,
        model: Path,
        opts: ServerOptions,
        backends: Sequence[Endpoint],
        results: Mapping[Endpoint, ProbeResult],
        when_short: WhenShort,
    ) -> Plan | Shortfall:
        info = await self.model(model)
        devices = backend_devices(backends, results)
        counts: dict[Endpoint, int] = {}
        for d in devices:
            if d.backend is not None:
                counts[d.backend] = counts.get(d.backend, 0) + 1
        host = await asyncio.to_thread(host_memory)
        request = plan_request(opts, backends, counts, when_short)
        return make_plan(info, devices, host, request)
