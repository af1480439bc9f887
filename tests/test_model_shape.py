"""The random-weight model at a size asked for: the size parsed and bounded, a shape that fills
it without passing it, weights above rpc-server's cache threshold, written streaming (small peak
memory) and the same bytes for the same seed. Loading it for real over two RPC backends is in
tests/test_node_cache.py, where the backend's cache fills from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.llama.model_shape import (
    MAX_MODEL_BYTES,
    RPC_CACHE_THRESHOLD,
    TINY,
    ModelSizeError,
    cacheable_bytes,
    parse_size,
    shape_for_size,
    tensor_bytes,
    tensors,
)
from corral.llama.tiny_model import write_tiny_model
from tests.support.bounded_child import run_bounded
from tests.support.corral_cli import corral, isolated_env

MiB = 1024**2
GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("512MiB", 512 * MiB),
        ("1GiB", GiB),
        ("1.5GB", 1_500_000_000),
        ("1g", GiB),
        (" 64 mib ", 64 * MiB),
        ("2048", 2048),
        ("10kB", 10_000),
    ],
)
def test_sizes_parse_in_binary_and_decimal_units(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(("text", "why"), [("1.5XB", "unknown unit"), ("GiB", "expected"),
                                          ("-1GiB", "expected"), ("", "expected")])  # fmt: skip
def test_bad_sizes_say_why(text: str, why: str) -> None:
    with pytest.raises(ModelSizeError, match=why):
        parse_size(text)


def test_sizes_below_the_tiny_model_or_above_the_limit_are_refused() -> None:
    with pytest.raises(ModelSizeError, match="below the tiny model"):
        shape_for_size(tensor_bytes(TINY) - 1)
    with pytest.raises(ModelSizeError, match="64 GiB"):
        shape_for_size(MAX_MODEL_BYTES + 1)
    assert shape_for_size(tensor_bytes(TINY)) == TINY


@given(st.integers(min_value=1 * MiB, max_value=MAX_MODEL_BYTES))
def test_the_shape_fills_the_size_without_passing_it(size: int) -> None:
    shape = shape_for_size(size)
    got = tensor_bytes(shape)
    assert 0.95 * size <= got <= size, (shape, got)
    assert shape.layers >= 2 and shape.embd % shape.heads == 0
    assert (shape.embd // shape.heads) % 2 == 0  # rope rotates pairs


@pytest.mark.parametrize("size", [128 * MiB, 512 * MiB, GiB, 64 * GiB])
def test_large_models_keep_their_bulk_above_the_cache_threshold(size: int) -> None:
    shape = shape_for_size(size)
    ffn = [t for t in tensors(shape) if ".ffn_" in t.name and t.fill == "random"]
    assert all(t.nbytes > RPC_CACHE_THRESHOLD for t in ffn)
    assert cacheable_bytes(shape) >= 0.7 * tensor_bytes(shape)


def test_the_file_matches_its_shape_and_the_seed_decides_the_bytes(tmp_path: Path) -> None:
    import gguf

    shape = shape_for_size(24 * MiB)
    one = write_tiny_model(tmp_path / "one.gguf", seed=7, shape=shape)
    two = write_tiny_model(tmp_path / "two.gguf", seed=7, shape=shape)
    other = write_tiny_model(tmp_path / "other.gguf", seed=8, shape=shape)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (one, two, other)]
    assert digest[0] == digest[1] != digest[2]
    reader = gguf.GGUFReader(str(one))
    assert [t.name for t in reader.tensors] == [t.name for t in tensors(shape)]
    assert sum(int(t.n_bytes) for t in reader.tensors) == tensor_bytes(shape)
    assert reader.fields["llama.block_count"].contents() == shape.layers
    assert not (tmp_path / "one.gguf.partial").exists()


def test_writing_a_large_model_streams_in_small_memory(tmp_path: Path) -> None:
    out = tmp_path / "big.gguf"
    code = (
        "import sys; from pathlib import Path\n"
        "from corral.llama.model_shape import shape_for_size\n"
        "from corral.llama.tiny_model import write_tiny_model\n"
        "write_tiny_model(Path(sys.argv[1]), shape=shape_for_size(256 * 1024**2))\n"
    )
    run = run_bounded(code, str(out), timeout_s=90)
    assert run.code == 0, run.err
    size = out.stat().st_size
    assert size > 250 * MiB
    # Holding the model would take 256 MiB; Python, numpy and gguf take about 50 MB.
    assert run.maxrss_mb < 100, f"peak {run.maxrss_mb:.0f} MB writing {size / MiB:.0f} MiB"


async def test_the_command_writes_the_size_asked_and_refuses_a_tiny_one(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    run = await corral("model", "tiny", str(tmp_path / "m.gguf"), "--size", "16MiB", env=env)
    assert run.code == 0, run.err
    assert 15 * MiB < (tmp_path / "m.gguf").stat().st_size <= 16 * MiB + MiB
    assert "cache (-c) keeps" in run.out
    small = await corral("model", "tiny", str(tmp_path / "s.gguf"), "--size", "1KiB", env=env)
    assert small.code == 2 and "below the tiny model" in small.err
    assert not (tmp_path / "s.gguf").exists()
