"""Write a tiny random-weight llama-architecture GGUF for tests and the demo.

Its weights are random: llama-server loads it in milliseconds and answers, but the text it
produces is nonsense. It exists to exercise the machinery (offload over RPC, failover), not to
say anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_CTX = 512
# A byte-level llama (SentencePiece-style) vocabulary: 3 specials, then <0x00>..<0xFF>.
SPECIALS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    import gguf  # imported here: only this command and the tests need it

    rng = np.random.default_rng(seed)
    tokens = [s.encode() for s in SPECIALS] + [f"<0x{i:02X}>".encode() for i in range(256)]
    n_vocab = len(tokens)
    scores = [0.0] * n_vocab
    # llama.cpp token types: 2 = unknown, 3 = control, 6 = byte.
    types = [2, 3, 3] + [6] * 256

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("corral-tiny-random")
    writer.add_description("Random weights: produces nonsense text. For tests only.")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int) -> None:
        data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        writer.add_tensor(name, data)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(N_EMBD, dtype=np.float32))

    tensor("token_embd.weight", n_vocab, N_EMBD)
    norm("output_norm.weight")
    tensor("output.weight", n_vocab, N_EMBD)
    for i in range(N_LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        tensor(f"blk.{i}.attn_q.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{i}.attn_k.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{i}.attn_v.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{i}.attn_output.weight", N_EMBD, N_EMBD)
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
