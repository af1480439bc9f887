"""Llama GGUFs of a chosen shape for the memory plan's tests: grouped-query attention, f16
weights (all zero: the plan is about bytes, not text), optionally split into parts.

`tensor_bytes` says, from the numpy arrays written, what each tensor holds: the tests compare
what the reader finds with it, never with numbers typed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corral.llama.tiny_model import CHAT_TEMPLATE, SPECIALS


@dataclass(frozen=True, slots=True)
class Shape:
    layers: int = 4
    embd: int = 256
    heads: int = 8
    kv_heads: int = 2
    ff: int = 512
    vocab: int = 1024
    ctx: int = 2048


def arrays(s: Shape) -> dict[str, np.ndarray]:
    """Every tensor of the model, by name, in the order written."""
    hd = s.embd // s.heads

    def w(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float16)

    def norm() -> np.ndarray:
        return np.ones(s.embd, dtype=np.float32)

    out = {"token_embd.weight": w(s.vocab, s.embd), "output_norm.weight": norm()}
    out["output.weight"] = w(s.vocab, s.embd)
    for i in range(s.layers):
        out[f"blk.{i}.attn_norm.weight"] = norm()
        out[f"blk.{i}.attn_q.weight"] = w(s.embd, s.embd)
        out[f"blk.{i}.attn_k.weight"] = w(s.kv_heads * hd, s.embd)
        out[f"blk.{i}.attn_v.weight"] = w(s.kv_heads * hd, s.embd)
        out[f"blk.{i}.attn_output.weight"] = w(s.embd, s.embd)
        out[f"blk.{i}.ffn_norm.weight"] = norm()
        out[f"blk.{i}.ffn_gate.weight"] = w(s.ff, s.embd)
        out[f"blk.{i}.ffn_up.weight"] = w(s.ff, s.embd)
        out[f"blk.{i}.ffn_down.weight"] = w(s.embd, s.ff)
    return out


def tensor_bytes(s: Shape) -> dict[str, int]:
    return {name: int(a.nbytes) for name, a in arrays(s).items()}


def write_model(path: Path, s: Shape, *, parts: int = 1) -> Path:
    """The model at `path`; split into `parts` files (named as gguf-split does) when > 1, and
    then the first part's path is returned."""
    import gguf

    tensors = arrays(s)
    per_part = -(-len(tensors) // parts) if parts > 1 else 0
    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=per_part)
    writer.add_name("corral-plan-test")
    writer.add_context_length(s.ctx)
    writer.add_embedding_length(s.embd)
    writer.add_block_count(s.layers)
    writer.add_feed_forward_length(s.ff)
    writer.add_rope_dimension_count(s.embd // s.heads)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = [t.encode() for t in SPECIALS] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"tok{i}".encode() for i in range(s.vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, a in tensors.items():
        writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if parts == 1:
        return path
    first = path.with_name(f"{path.stem}-00001-of-{parts:05d}.gguf")
    assert first.is_file(), sorted(p.name for p in path.parent.iterdir())
    return first
