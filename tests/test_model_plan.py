"""The memory plan's maths and the GGUF reader behind it, on models written with the gguf writer.

No processes here: what the plan says is checked against llama-server itself in
test_model_plan_llama.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from corral.endpoint import Endpoint
from corral.llama.split import parse_tensor_split
from corral.models.gguf_info import MAX_TENSORS, ModelInfo, ModelInfoError, read_model_info
from corral.models.plan import (
    GIB,
    MIB,
    DeviceMemory,
    Plan,
    PlanRequest,
    Shortfall,
    WhenShort,
    make_plan,
    slot_devices,
)
from tests.support.plan_models import Shape, tensor_bytes, write_model

SHAPE = Shape(layers=6, embd=256, heads=8, kv_heads=2, ff=768, vocab=2048, ctx=8192)
A, B = Endpoint("198.18.0.1", 50052), Endpoint("198.18.0.2", 50052)
HOST = DeviceMemory(None, 0, 16 * GIB, 24 * GIB)


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    return read_model_info(write_model(tmp_path_factory.mktemp("m") / "m.gguf", SHAPE))


def test_reader_finds_the_shape_and_every_tensors_bytes(info: ModelInfo) -> None:
    sizes = tensor_bytes(SHAPE)
    assert (info.architecture, info.n_layer, info.n_embd) == ("llama", 6, 256)
    assert (info.n_head, info.n_head_kv, info.n_ff, info.n_vocab) == (8, 2, 768, 2048)
    assert info.context_length == SHAPE.ctx
    assert info.n_embd_k_gqa == info.n_embd_v_gqa == SHAPE.kv_heads * SHAPE.embd // SHAPE.heads
    for i in range(SHAPE.layers):
        assert info.layer_bytes[i] == sum(v for k, v in sizes.items() if k.startswith(f"blk.{i}."))
    assert info.token_embd_bytes == sizes["token_embd.weight"]
    assert info.output_bytes == sizes["output.weight"]
    assert info.output_norm_bytes == sizes["output_norm.weight"]
    assert info.weight_bytes == sum(sizes.values())


def test_a_split_model_is_read_whole_from_any_part(tmp_path: Path, info: ModelInfo) -> None:
    first = write_model(tmp_path / "s.gguf", SHAPE, parts=3)
    whole = read_model_info(first)
    assert whole.parts == 3
    assert whole.layer_bytes == info.layer_bytes and whole.weight_bytes == info.weight_bytes
    third = first.with_name(first.name.replace("00001-of", "00003-of"))
    assert read_model_info(third).weight_bytes == info.weight_bytes
    third.unlink()
    with pytest.raises(ModelInfoError, match=r"00003-of-00003\.gguf: no such file"):
        read_model_info(first)


def test_absurd_or_foreign_files_are_refused_saying_why(tmp_path: Path) -> None:
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, MAX_TENSORS + 1, 1) + bytes(64))
    with pytest.raises(ModelInfoError, match=rf"huge\.gguf: claims {MAX_TENSORS + 1} tensors"):
        read_model_info(huge)
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n" * 4)
    with pytest.raises(ModelInfoError, match=r"notes\.gguf: not a GGUF file"):
        read_model_info(text)


def test_slots_follow_llama_cpps_upper_bound_rule() -> None:
    # The last `offloaded` slots go to devices; slot j to the first device whose cumulative
    # share exceeds j / offloaded (src/llama-model.cpp).
    assert slot_devices([1, 1], 9, 9) == [0] * 5 + [1] * 4
    assert slot_devices([5, 4], 9, 9) == [0] * 5 + [1] * 4
    assert slot_devices([2, 1], 7, 3) == [None] * 4 + [0, 0, 1]
    assert slot_devices([0, 1], 3, 3) == [1, 1, 1]


def _devices(free: int, n: int = 2, total: int | None = None) -> list[DeviceMemory]:
    return [DeviceMemory(ep, 0, free, total or free) for ep in (A, B)[:n]]


def _plan(info: ModelInfo, devices: list[DeviceMemory], **kw: object) -> Plan | Shortfall:
    return make_plan(info, devices, HOST, PlanRequest(**kw))  # type: ignore[arg-type]


def test_plenty_of_memory_splits_by_free_memory_and_offloads_every_slot(info: ModelInfo) -> None:
    plan = _plan(info, _devices(8 * GIB), ctx_size=4096)
    assert isinstance(plan, Plan)
    assert plan.gpu_layers == info.n_layer + 1 and plan.ctx == 4096
    assert [d.layers for d in plan.backends] == [4, 2]  # 7 slots, halves: 4 + (2 + output)
    assert plan.backends[-1].output and plan.tensor_split == "4,3"
    kv_per_layer = 4096 * (info.n_embd_k_gqa + info.n_embd_v_gqa) * 2
    assert [d.kv for d in plan.backends] == [4 * kv_per_layer, 2 * kv_per_layer]
    assert plan.backends[0].weights == sum(info.layer_bytes[:4])
    assert plan.host.weights == info.token_embd_bytes and plan.host.layers == 0


def test_no_context_given_takes_the_models_own_when_it_fits(info: ModelInfo) -> None:
    plan = _plan(info, _devices(8 * GIB))
    assert isinstance(plan, Plan) and plan.ctx == SHAPE.ctx


def test_short_backends_get_one_sentence_with_the_numbers(info: ModelInfo) -> None:
    free = 12 * MIB  # less than half of what the model needs on each
    short = _plan(info, _devices(free), ctx_size=4096)
    assert isinstance(short, Shortfall)
    assert short.free == 2 * (free - int(free * 0.05))
    assert short.need > short.free
    gap = (short.need - short.free) / MIB
    assert short.reason.startswith("the model needs ")
    assert "on the backends; the 2 ready backends have " in short.reason
    assert short.reason.endswith(f"{gap:.1f} MiB short")


def test_uneven_devices_are_filled_to_what_each_can_hold(info: ModelInfo) -> None:
    big, small = 2 * GIB, 20 * MIB
    devices = [DeviceMemory(A, 0, small, small), DeviceMemory(B, 0, big, big)]
    plan = _plan(info, devices, ctx_size=4096)
    assert isinstance(plan, Plan) and plan.gpu_layers == info.n_layer + 1
    assert all(d.fits for d in plan.devices)
    assert plan.backends[0].layers < plan.backends[1].layers


def test_when_short_cpu_keeps_the_first_layers_on_this_host(info: ModelInfo) -> None:
    free = 24 * MIB
    waited = _plan(info, _devices(free, 1), ctx_size=4096)
    assert isinstance(waited, Shortfall)
    plan = _plan(info, _devices(free, 1), ctx_size=4096, when_short=WhenShort.CPU)
    assert isinstance(plan, Plan)
    assert 0 < plan.gpu_layers < info.n_layer + 1
    assert plan.backends[0].output and plan.backends[0].fits
    assert plan.host.layers == info.n_layer + 1 - plan.gpu_layers
    assert plan.host.kv == plan.host.layers * 4096 * (info.n_embd_k_gqa + info.n_embd_v_gqa) * 2


def test_a_named_split_is_kept_and_checked(info: ModelInfo) -> None:
    split = parse_tensor_split(f"{A}=1,{B}=0")
    assert split is not None
    arg = split.argument([A, B], {A: 1, B: 1})
    kept = _plan(info, _devices(GIB), ctx_size=4096, tensor_split=split.text, split_argument=arg)
    assert isinstance(kept, Plan) and kept.user_split
    assert [d.layers for d in kept.backends] == [info.n_layer, 0] and kept.backends[0].output
    short = _plan(
        info, _devices(30 * MIB), ctx_size=4096, tensor_split=split.text, split_argument=arg
    )
    assert isinstance(short, Shortfall)
    assert short.reason.startswith(f"--tensor-split {split.text} puts ")
    assert f"on {A} #0, which has" in short.reason


def test_the_context_shrinks_to_fit_before_giving_up(info: ModelInfo) -> None:
    roomy = _plan(info, _devices(8 * GIB))
    assert isinstance(roomy, Plan)
    # Enough for everything at 4096 but not at the model's 8192.
    at_4096 = _plan(info, _devices(8 * GIB), ctx_size=4096)
    assert isinstance(at_4096, Plan)
    free = max(d.need for d in at_4096.backends)
    free += (max(d.need for d in roomy.backends) - free) // 2
    total = int(free / 0.95) + 1  # so the 5 % reserve leaves `free` usable
    plan = _plan(info, [DeviceMemory(ep, 0, total, total) for ep in (A, B)])
    assert isinstance(plan, Plan) and plan.ctx == 4096
