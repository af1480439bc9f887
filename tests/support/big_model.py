"""A random-weight llama GGUF big enough that loading it takes seconds, for loading tests.

The tiny model (corral.llama.tiny_model) loads in milliseconds: nothing can be observed or
interrupted half-way. This one has few, wide layers, so every feed-forward tensor is larger than
10 MiB (rpc-server's cache threshold) and a load over RPC moves hundreds of MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from corral.llama.tiny_model import CHAT_TEMPLATE, SPECIALS

N_EMBD = 2048
N_HEAD = 16
N_FF = 8192  # one ffn tensor: 2048 x 8192 x 4 bytes = 64 MiB


def write_big_model(path: Path, layers: int = 2, seed: int = 0) -> Path:
    """About 256 MiB per layer (F32) plus a few MiB; written beside, then renamed into place."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = [s.encode() for s in SPECIALS] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tmp = path.with_suffix(path.suffix + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("corral-big-random")
    writer.add_context_length(512)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(N_FF)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * 256)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(N_EMBD, dtype=np.float32))

    tensor("token_embd.weight", len(tokens), N_EMBD)
    norm("output_norm.weight")
    tensor("output.weight", len(tokens), N_EMBD)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("q", "k", "v", "output"):
            tensor(f"blk.{i}.attn_{part}.weight", N_EMBD, N_EMBD)
        norm(f"blk.{i}.ffn_norm.weight")
        tensor(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
