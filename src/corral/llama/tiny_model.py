"""Write a random-weight llama-architecture GGUF for tests, the demo and benchmarks.

Its weights are random: llama-server loads it and answers, but the text it produces is
nonsense. It exists to exercise the machinery (offload over RPC, failover, rpc-server's tensor
cache), not to say anything. The tiny one (~0.5 MB) is the default; `model_shape` scales the
same architecture to a size asked for.

Written streaming: the header and tensor table first, then each tensor generated and written a
few MiB at a time, so writing a 64 GiB model takes no more memory than the tiny one. The random
numbers come from one generator seeded with `seed`, drawn in a fixed order: the same seed and
shape give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from corral.llama.model_shape import TINY, ModelShape, TensorSpec, tensors

N_CTX = 512
# A byte-level llama (SentencePiece-style) vocabulary: 3 specials, then <0x00>..<0xFF>.
SPECIALS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
CHUNK_VALUES = 1 << 20  # values drawn at once: 8 MiB of float64 while generating
WEIGHT_SCALE = 0.02

Progress = Callable[[int, int], None]  # (bytes written, bytes in all)


def write_tiny_model(
    path: Path, seed: int = 0, shape: ModelShape = TINY, progress: Progress | None = None
) -> Path:
    import gguf  # imported here: only this command and the tests need it

    rng = np.random.default_rng(seed)
    tokens = [s.encode() for s in SPECIALS] + [f"<0x{i:02X}>".encode() for i in range(256)]
    if len(tokens) != shape.vocab:
        raise ValueError(f"model shape: vocabulary of {shape.vocab}, tokenizer has {len(tokens)}")
    # llama.cpp token types: 2 = unknown, 3 = control, 6 = byte.
    types = [2, 3, 3] + [6] * 256

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("corral-tiny-random" if shape == TINY else "corral-random")
    writer.add_description("Random weights: produces nonsense text. For tests only.")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(shape.embd)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_rope_dimension_count(shape.embd // shape.heads)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    specs = list(tensors(shape))
    for spec in specs:  # the table only: the data is written below, as it is generated
        writer.add_tensor_info(spec.name, spec.dims, np.dtype(np.float32), spec.nbytes)
    total = sum(spec.nbytes for spec in specs)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None  # opened by write_header_to_file
        out: IO[bytes] = writer.fout[0]
        done = 0
        for spec in specs:
            writer.write_padding(out, out.tell())  # each tensor starts aligned, as the table says
            done = _write_tensor(out, spec, rng, done, total, progress)
            writer.write_padding(out, spec.nbytes)
    finally:
        writer.close()
    tmp.replace(path)
    return path


def _write_tensor(
    out: IO[bytes],
    spec: TensorSpec,
    rng: np.random.Generator,
    done: int,
    total: int,
    progress: Progress | None,
) -> int:
    cols = spec.dims[-1]
    rows = spec.dims[0] if len(spec.dims) > 1 else 1
    step = max(1, CHUNK_VALUES // cols)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        block: np.ndarray[Any, Any]
        if spec.fill == "ones":
            block = np.ones((n, cols), dtype=np.float32)
        else:
            block = (rng.standard_normal((n, cols)) * WEIGHT_SCALE).astype(np.float32)
        out.write(block.tobytes())
        done += block.nbytes
        if progress is not None:
            progress(done, total)
    return done
