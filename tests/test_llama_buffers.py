"""Reading what llama-server allocated per device from its log (corral.llama.buffers).

The first test runs the real thing: two real ggml-rpc-servers and a real llama-server started
with Corral's own command line (`server_argv`, which asks for `-lv 4`); its log is parsed and
checked against what the log says line by line and against what the model must take (its
tensors' bytes; the KV cache's size from the model's shape and the context). The others feed
the parser lines in the forms that run printed, to pin its rules.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import gguf
import httpx

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.llama.buffers import (
    HOST,
    MAX_DEVICES,
    MAX_LINE,
    MIB,
    device_memory,
    device_of,
    parse_buffers,
)
from corral.llama.server import ServerOptions, server_argv, server_env
from corral.llama.supervisor import Child
from corral.types import BufferBytes, DeviceMemory, DeviceRef
from tests.support.loopback import free_port, next_loopback
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

CTX = 512
HALF_STEP = MIB // 200 + 1  # a size printed as "%.2f MiB" is within this of the truth


def _model_shape(model: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes of the KV cache per context cell) from the GGUF itself."""
    reader = gguf.GGUFReader(str(model))

    def number(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    n_embd, heads = number("llama.embedding_length"), number("llama.attention.head_count")
    kv_heads, layers = number("llama.attention.head_count_kv"), number("llama.block_count")
    per_cell = layers * 2 * (n_embd // heads) * kv_heads * 2  # K and V, f16
    return sum(int(t.n_bytes) for t in reader.tensors), per_cell


def _lines_by_device(text: str, backends: list[Endpoint]) -> dict[DeviceRef, int]:
    """Every 'buffer size' line, read the plain way: the name before the kind, the MiB after."""
    names = {f"RPC0[{ep}]": DeviceRef(ep, "0") for ep in backends}
    found: dict[DeviceRef, int] = {}
    for line in text.splitlines():
        if " buffer size = " not in line:
            continue
        head, _, size = line.partition(" buffer size = ")
        name = head.split(": ", 1)[1].split()[0]
        ref = names.get(name, DeviceRef(None, HOST))
        assert name in names or name.startswith("CPU"), line
        found[ref] = found.get(ref, 0) + round(float(size.removesuffix(" MiB").strip()) * MIB)
    return found


async def test_a_real_llama_server_log_gives_each_backend_its_bytes(
    rpc_server: StartRpc, llama_bins: LlamaBinaries, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    host = next_loopback()
    opts = ServerOptions(
        host=host, port=free_port(host), ctx_size=CTX, extra_args=("--tensor-split", "1,1")
    )
    argv = server_argv(llama_bins.llama_server, tiny_model, opts, [a, b])
    assert argv[argv.index("-lv") + 1] == "4"
    log = tmp_path / "llama-server.log"
    child = Child(argv, log, env=server_env({}))
    await child.start()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as client:

            async def ready() -> bool:
                assert child.returncode is None, child.log_tail()
                try:
                    return (await client.get(opts.base_url + "/health")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(ready, 30, "llama-server /health 200")
    finally:
        await child.stop(grace=5)
    text = await asyncio.to_thread(log.read_text)

    used = parse_buffers(text)

    # Each backend llama-server was given holds something, under its own endpoint, device 0.
    assert set(used) == {DeviceRef(a, "0"), DeviceRef(b, "0"), DeviceRef(None, HOST)}, used
    for ep in (a, b):
        assert used[DeviceRef(ep, "0")].total > 0, (ep, used)
        assert used[DeviceRef(ep, "0")].model > 0, (ep, used)
    # Every line the log has is counted, on the device it names, once.
    by_line = _lines_by_device(text, [a, b])
    assert {ref: u.total for ref, u in used.items()} == by_line
    # What the model must take: its tensors (all offloaded but the token embedding, which
    # stays on the host: the sum is over every device) and a KV cache of CTX cells.
    lines = sum(" model buffer size = " in line for line in text.splitlines())
    tensors, per_cell = _model_shape(tiny_model)
    weights = sum(u.model for u in used.values())
    assert abs(weights - tensors) <= lines * HALF_STEP + 64 * 32, (weights, tensors)
    assert sum(u.kv for u in used.values()) == CTX * per_cell
    assert used[DeviceRef(None, HOST)].compute > 0  # llama-server's own scratch


# The forms the real run above printed (with its time and level prefix), as parser input.
REAL = """\
0.00.022.861 I load_tensors:   CPU_Mapped model buffer size =     0.06 MiB
0.00.022.862 I load_tensors: RPC0[127.0.0.91:50091] model buffer size =     0.31 MiB
0.00.022.863 I load_tensors: RPC0[127.0.0.92:50092] model buffer size =     0.06 MiB
0.00.024.586 I llama_context: constructing llama_context
0.00.024.635 I llama_context:        CPU  output buffer size =     0.00 MiB
0.00.024.829 I llama_kv_cache: RPC0[127.0.0.91:50091] KV buffer size =     0.25 MiB
0.00.024.862 I llama_kv_cache: size =    0.25 MiB (   512 cells,   2 layers,  4/1 seqs), K (f16):    0.12 MiB, V (f16):    0.12 MiB
0.00.025.115 I sched_reserve: reserving ...
0.00.027.957 I sched_reserve: RPC0[127.0.0.91:50091] compute buffer size =     4.68 MiB
0.00.027.962 I sched_reserve: RPC0[127.0.0.92:50092] compute buffer size =     0.01 MiB
0.00.027.963 I sched_reserve:        CPU compute buffer size =     3.32 MiB
"""  # noqa: E501
A, B = Endpoint("127.0.0.91", 50091), Endpoint("127.0.0.92", 50092)


def mib(x: float) -> int:
    return round(x * MIB)


def test_the_forms_of_this_build() -> None:
    assert parse_buffers(REAL) == {
        DeviceRef(None, HOST): BufferBytes(model=mib(0.06), compute=mib(3.32)),
        DeviceRef(A, "0"): BufferBytes(model=mib(0.31), kv=mib(0.25), compute=mib(4.68)),
        DeviceRef(B, "0"): BufferBytes(model=mib(0.06), compute=mib(0.01)),
    }


def test_a_reservation_replaces_the_last_one_of_its_context_only() -> None:
    again = """\
sched_reserve: reserving ...
sched_reserve: RPC0[127.0.0.91:50091] compute buffer size =     6.00 MiB
llama_context: constructing llama_context
sched_reserve: reserving ...
sched_reserve: RPC0[127.0.0.91:50091] compute buffer size =     1.00 MiB
"""
    used = parse_buffers(REAL + again)
    # The first context's compute is now 6.00 MiB (was 4.68); the second context adds 1.00.
    assert used[DeviceRef(A, "0")].compute == mib(6.00) + mib(1.00)
    # B was not in the first context's new reservation: that context no longer holds its buffer.
    assert used[DeviceRef(B, "0")].compute == 0
    assert used[DeviceRef(B, "0")].model == mib(0.06)


def test_model_and_kv_buffers_add_up() -> None:
    more = """\
load_tensors: RPC1[gpu-box.lan:50052] model buffer size =  1024.50 MiB
load_tensors: RPC1[gpu-box.lan:50052] model buffer size =    10.25 MiB
llama_kv_cache: RPC1[gpu-box.lan:50052] KV buffer size =   256.00 MiB
llama_memory_recurrent: RPC1[gpu-box.lan:50052] RS buffer size =     2.00 MiB
llama_kv_cache_dsv4: RPC1[gpu-box.lan:50052] DSV4 compressor state buffer size =     1.00 MiB
llama_adapter_lora_init_impl: RPC1[gpu-box.lan:50052] LoRA buffer size =    16.00 MiB
llama_context:  CUDA_Host  output buffer size =     0.50 MiB
load_tensors:        CUDA0 model buffer size =   100.00 MiB
"""
    used = parse_buffers(more)
    box = used[DeviceRef(Endpoint("gpu-box.lan", 50052), "1")]
    assert box == BufferBytes(
        model=mib(1024.50) + mib(10.25) + mib(16.00),
        kv=mib(256.00) + mib(2.00) + mib(1.00),
    )
    assert used[DeviceRef(None, HOST)] == BufferBytes(compute=mib(0.50))
    assert used[DeviceRef(None, "CUDA0")] == BufferBytes(model=mib(100.00))


def test_what_is_not_a_buffer_line_is_ignored() -> None:
    junk = "\n".join(
        [
            "load_tensors: RPC0[not an endpoint] model buffer size =     1.00 MiB",
            "load_tensors: RPC0[127.0.0.1:0] model buffer size =     1.00 MiB",  # port 0
            "load_tensors: RPC0[127.0.0.1:1] model buffer size =     1.00 GiB",
            "load_tensors: RPC0[127.0.0.1:1] model buffer size =     -1.00 MiB",
            "load_tensors: RPC0[127.0.0.1:1] model buffer size = 1e9 MiB",
            "load_tensors: RPC0[127.0.0.1:1] swap buffer size =     1.00 MiB",
            "load_tensors: RPC0[127.0.0.1:1] model buffer size =     1.00 MiB trailing",
            "user text: RPC0[127.0.0.1:1] model buffer size = " + "9" * 40 + ".00 MiB",
            "x: " + "A" * MAX_LINE + " model buffer size =     1.00 MiB",
            "load_tensors: RPC0[127.0.0.1:1 model buffer size =     1.00 MiB",
            "load_tensors: RPC2000[127.0.0.1:1] model buffer size =     1.00 MiB",
            "\x00\xff garbage",
        ]
    )
    assert parse_buffers(junk) == {}
    assert device_of("RPC0[[::1]:50052]") == DeviceRef(Endpoint("::1", 50052), "0")
    assert device_of("RPC3[box:1]") == DeviceRef(Endpoint("box", 1), "3")
    assert device_of("CPU_REPACK") == DeviceRef(None, HOST)


def test_devices_past_the_cap_are_not_counted() -> None:
    many = "\n".join(
        f"load_tensors: RPC0[127.0.0.1:{port}] model buffer size =     1.00 MiB"
        for port in range(1, MAX_DEVICES + 50)
    )
    used = parse_buffers(many)
    assert len(used) == MAX_DEVICES
    assert DeviceRef(Endpoint("127.0.0.1", 1), "0") in used
    assert DeviceRef(Endpoint("127.0.0.1", MAX_DEVICES + 10), "0") not in used


def test_planned_and_used_side_by_side() -> None:
    used = parse_buffers(REAL)
    c = DeviceRef(Endpoint("127.0.0.93", 50093), "0")
    planned = {DeviceRef(A, "0"): 6 * MIB, c: 1 * MIB, DeviceRef(None, HOST): 4 * MIB}
    both = device_memory(used, planned)
    # Backends by endpoint, then the local machine.
    assert [m.ref for m in both] == [DeviceRef(A, "0"), DeviceRef(B, "0"), c, DeviceRef(None, HOST)]
    got = {m.ref: m for m in both}
    assert got[DeviceRef(A, "0")].planned_bytes == 6 * MIB
    assert got[DeviceRef(A, "0")].used_bytes == used[DeviceRef(A, "0")].total
    assert got[DeviceRef(B, "0")].planned_bytes is None  # no plan for it
    assert got[c].used == BufferBytes()  # planned, but the log puts nothing on it
    # No log to read (an adopted llama-server): used unknown, the plan still shown.
    assert device_memory(None, planned)[0] == DeviceMemory(DeviceRef(A, "0"), 6 * MIB, None)
    assert device_memory(None, None) == ()
