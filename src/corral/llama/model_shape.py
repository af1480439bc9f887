"""The shape of the random-weight llama model for a size asked for (pure).

The tiny model (2 layers, 64 wide) stays what tests and the demo have always used. A larger size
keeps the same architecture and byte-level vocabulary, and grows width and depth so the bulk of
the bytes sits in tensors larger than rpc-server's cache threshold (`HASH_THRESHOLD`, 10 MiB, in
ggml-rpc.cpp: only weight tensors strictly larger than it are hashed and cached by `-c`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

F32_BYTES = 4
N_VOCAB = 259  # 3 specials, then <0x00>..<0xFF>
RPC_CACHE_THRESHOLD = 10 * 1024 * 1024  # ggml-rpc.cpp HASH_THRESHOLD (size > threshold)
MAX_MODEL_BYTES = 64 * 1024**3
LAYER_BYTES_TARGET = 256 * 1024**2  # one layer of a 1 GiB model: 4 layers, 2048 wide
MIN_LAYERS = 2  # so `--tensor-split 1,1` gives each of two backends a layer
MAX_LAYERS = 128
FF_STEP = 32

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")

Fill = Literal["random", "ones"]


class ModelSizeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelShape:
    layers: int
    embd: int
    heads: int
    ff: int
    vocab: int = N_VOCAB


TINY = ModelShape(layers=2, embd=64, heads=4, ff=128)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # numpy order (rows, columns); GGUF stores them reversed
    fill: Fill

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * F32_BYTES


def parse_size(text: str) -> int:
    """'512MiB', '1GiB', '1.5GB', '1g' -> bytes. KiB/MiB/GiB (and K/M/G) are powers of 1024,
    kB/MB/GB powers of 1000; a bare number is bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ModelSizeError(f"size {text!r}: expected a number and a unit, e.g. 512MiB, 1.5GB")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        known = "B, KiB, MiB, GiB, TiB, kB, MB, GB, TB"
        raise ModelSizeError(f"size {text!r}: unknown unit {unit!r} (one of {known})")
    return int(float(number) * factor)


def tensors(shape: ModelShape) -> Iterator[TensorSpec]:
    """Every tensor of the model, in the order they are written."""
    e, f, v = shape.embd, shape.ff, shape.vocab
    yield TensorSpec("token_embd.weight", (v, e), "random")
    yield TensorSpec("output_norm.weight", (e,), "ones")
    yield TensorSpec("output.weight", (v, e), "random")
    for i in range(shape.layers):
        yield TensorSpec(f"blk.{i}.attn_norm.weight", (e,), "ones")
        for part in ("q", "k", "v", "output"):
            yield TensorSpec(f"blk.{i}.attn_{part}.weight", (e, e), "random")
        yield TensorSpec(f"blk.{i}.ffn_norm.weight", (e,), "ones")
        yield TensorSpec(f"blk.{i}.ffn_gate.weight", (f, e), "random")
        yield TensorSpec(f"blk.{i}.ffn_up.weight", (f, e), "random")
        yield TensorSpec(f"blk.{i}.ffn_down.weight", (e, f), "random")


def tensor_bytes(shape: ModelShape) -> int:
    return sum(t.nbytes for t in tensors(shape))


def cacheable_bytes(shape: ModelShape) -> int:
    """Bytes in tensors rpc-server's `-c` cache keeps (larger than its threshold)."""
    return sum(t.nbytes for t in tensors(shape) if t.nbytes > RPC_CACHE_THRESHOLD)


def _embd_for(layer_bytes: float) -> int:
    # With ff = 4 * embd a layer holds 16 embd² floats (64 embd² bytes).
    embd = int(math.sqrt(max(layer_bytes, 0.0) / (16 * F32_BYTES)))
    if embd >= 512:
        return embd // 128 * 128  # heads of 128: embd must divide by them
    return max(64, embd // 64 * 64)


def shape_for_size(size: int) -> ModelShape:
    """The shape whose tensors come closest to `size` bytes without passing it (the tiny model's
    tensors are the least; `MAX_MODEL_BYTES` the most)."""
    least = tensor_bytes(TINY)
    if size < least:
        raise ModelSizeError(
            f"size {size} bytes is below the tiny model ({least} bytes of tensors); "
            "ask for more, or leave --size out for the tiny one"
        )
    if size > MAX_MODEL_BYTES:
        raise ModelSizeError(f"size {size} bytes is above the limit of {MAX_MODEL_BYTES} (64 GiB)")
    if size == least:
        return TINY
    layers = min(MAX_LAYERS, max(MIN_LAYERS, size // LAYER_BYTES_TARGET))
    embd = _embd_for(size / layers)
    heads = max(4, embd // 128) if embd >= 512 else 4
    fixed = 2 * N_VOCAB * embd * F32_BYTES + (2 * layers + 1) * embd * F32_BYTES
    attn = layers * 4 * embd * embd * F32_BYTES
    per_ff = layers * 3 * embd * F32_BYTES  # bytes one more feed-forward unit costs
    ff = max(FF_STEP, (size - fixed - attn) // per_ff // FF_STEP * FF_STEP)
    shape = ModelShape(layers=layers, embd=embd, heads=heads, ff=ff)
    while ff > FF_STEP and tensor_bytes(shape) > size:  # rounding never passes the size asked
        ff -= FF_STEP
        shape = ModelShape(layers=layers, embd=embd, heads=heads, ff=ff)
    if tensor_bytes(shape) > size:
        return TINY
    return shape
