"""What a GGUF model holds, as far as memory goes: its shape and the bytes of its tensors.

Reads the metadata and the tensor table with the `gguf` package's GGUFReader, which maps the file
(np.memmap): the weights are never read. A split model (`name-00001-of-00003.gguf`) is read part
by part; any part may be named. Before the reader parses anything, the header's counts are checked
so that a damaged or hostile file is refused with a clear error instead of a long parse.

I/O: call it in a thread from async code. The result, `ModelInfo`, is a plain value.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.models import gguf_names
from corral.models.reference import ModelError

GGUF_MAGIC = b"GGUF"
MAX_TENSORS = 65_536  # the largest models known have a few thousand
MAX_KV = 16_384  # metadata entries (a vocabulary is one entry, an array)
MAX_PARTS = 256
MAX_LAYERS = 4_096
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class ModelInfoError(ValueError):
    """The file is not a model we can plan for; the message names the file and why."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: str  # the first part
    parts: int
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    context_length: int  # the context it was trained for (llama-server's default -c)
    n_embd_k_gqa: int  # K width per token and layer in the KV cache
    n_embd_v_gqa: int
    layer_bytes: tuple[int, ...]  # weights of each repeating layer (blk.N.*)
    token_embd_bytes: int  # kept on the host by llama.cpp, whatever -ngl says
    output_bytes: int  # output.weight (a copy of token_embd when the model ties them)
    output_norm_bytes: int
    other_bytes: int  # any other tensor (rope factors ...): counted on the host

    @property
    def weight_bytes(self) -> int:
        return (
            sum(self.layer_bytes)
            + self.token_embd_bytes
            + self.output_bytes
            + self.output_norm_bytes
            + self.other_bytes
        )


def split_parts(path: Path) -> list[Path]:
    """Every part of a split model (named as llama.cpp's gguf-split writes them), else [path]."""
    try:
        names = gguf_names.split_parts(str(path))
    except ModelError as exc:
        raise ModelInfoError(str(exc)) from None
    if len(names) > MAX_PARTS:
        raise ModelInfoError(f"{path}: split into {len(names)} parts; at most {MAX_PARTS} are read")
    return [Path(n) for n in names]


def read_model_info(path: Path) -> ModelInfo:
    """Raises ModelInfoError (a ValueError) saying which file and why."""
    parts = split_parts(path)
    for part in parts:
        if not part.is_file():
            raise ModelInfoError(f"{part}: no such file (part of the split model {path.name})")
    readers = [_open(part) for part in parts]
    first = readers[0]
    count = _optional_int(first, "split.count", parts[0])
    if count is not None and count != len(parts):
        raise ModelInfoError(f"{parts[0]}: says it is split into {count} parts, found {len(parts)}")
    arch = _text(first, "general.architecture", parts[0])
    sizes: dict[str, int] = {}
    for part, reader in zip(parts, readers, strict=True):
        for tensor in reader.tensors:
            sizes[str(tensor.name)] = int(tensor.n_bytes)
        if len(sizes) > MAX_TENSORS:
            raise ModelInfoError(f"{part}: more than {MAX_TENSORS} tensors in all")
    return _info(str(parts[0]), len(parts), arch, first, parts[0], sizes)


def _info(
    path: str, parts: int, arch: str, reader: Any, where: Path, sizes: dict[str, int]
) -> ModelInfo:
    def need(key: str) -> int:
        value = _optional_int(reader, f"{arch}.{key}", where)
        if value is None:
            raise ModelInfoError(f"{where}: no {arch}.{key} in its metadata")
        return value

    n_layer = need("block_count")
    if not 1 <= n_layer <= MAX_LAYERS:
        raise ModelInfoError(f"{where}: {n_layer} layers; expected 1 to {MAX_LAYERS}")
    n_embd = need("embedding_length")
    n_head = need("attention.head_count")
    if n_embd <= 0 or n_head <= 0:
        raise ModelInfoError(f"{where}: embedding width {n_embd}, {n_head} heads")
    n_head_kv = _optional_int(reader, f"{arch}.attention.head_count_kv", where) or n_head
    key_len = _optional_int(reader, f"{arch}.attention.key_length", where) or n_embd // n_head
    value_len = _optional_int(reader, f"{arch}.attention.value_length", where) or n_embd // n_head
    layers = [0] * n_layer
    embd = output = norm = other = 0
    for name, size in sizes.items():
        block = _BLOCK.match(name)
        if block is not None and int(block[1]) < n_layer:
            layers[int(block[1])] += size
        elif name == "token_embd.weight":
            embd = size
        elif name == "output.weight":
            output = size
        elif name == "output_norm.weight":
            norm = size
        else:
            other += size
    if "token_embd.weight" not in sizes:
        raise ModelInfoError(f"{where}: no token_embd.weight tensor")
    vocab = _optional_int(reader, f"{arch}.vocab_size", where) or _vocab(reader, where)
    return ModelInfo(
        path=path,
        parts=parts,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=_optional_int(reader, f"{arch}.feed_forward_length", where) or 4 * n_embd,
        n_vocab=vocab,
        context_length=need("context_length"),
        n_embd_k_gqa=key_len * n_head_kv,
        n_embd_v_gqa=value_len * n_head_kv,
        layer_bytes=tuple(layers),
        token_embd_bytes=embd,
        # Tied embeddings: llama.cpp puts a copy of token_embd on the output layer's device.
        output_bytes=output if "output.weight" in sizes else embd,
        output_norm_bytes=norm,
        other_bytes=other,
    )


def _open(part: Path) -> Any:
    """A GGUFReader over `part`, after checking the header's counts."""
    try:
        with part.open("rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ModelInfoError(f"{part}: cannot read: {exc.strerror or exc}") from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelInfoError(f"{part}: not a GGUF file (no GGUF magic)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelInfoError(f"{part}: GGUF version {version}; this reader knows 2 and 3")
    if n_tensors > MAX_TENSORS:
        raise ModelInfoError(f"{part}: claims {n_tensors} tensors; at most {MAX_TENSORS} are read")
    if n_kv > MAX_KV:
        raise ModelInfoError(f"{part}: claims {n_kv} metadata entries; at most {MAX_KV} are read")
    import gguf  # imported here: only planning needs it

    try:
        return gguf.GGUFReader(part, "r")
    except (ValueError, IndexError, KeyError, OSError, struct.error) as exc:
        raise ModelInfoError(f"{part}: damaged GGUF ({exc})") from None


def _value(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _optional_int(reader: Any, key: str, where: Path) -> int | None:
    value = _value(reader, key)
    if isinstance(value, Sequence) and not isinstance(value, str):
        # Per-layer values (some architectures vary heads by layer): the most any layer takes.
        value = max((v for v in value if isinstance(v, int)), default=None)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelInfoError(f"{where}: {key} is {value!r}, not a count")
    return value


def _text(reader: Any, key: str, where: Path) -> str:
    value = _value(reader, key)
    if not isinstance(value, str) or not value:
        raise ModelInfoError(f"{where}: no {key} in its metadata")
    return value


def _vocab(reader: Any, where: Path) -> int:
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
        raise ModelInfoError(f"{where}: no vocabulary size (tokenizer.ggml.tokens)")
    return len(field.data)
