"""Synthetic GGUF models: llama.cpp's names, shapes, metadata and type mixes, random weights."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from metallic.errors import MetallicError
from metallic.gguf.reader import TensorInfo, open_gguf
from metallic.testing.synthetic import (
    MIXES,
    PRESETS,
    WEIGHT_STD,
    main,
    tensor_plan,
    tensor_types,
    write_synthetic_model,
)

T = GGMLQuantizationType
TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]


def _values(info: TensorInfo) -> np.ndarray:
    """Dequantized float32 values of one tensor, in its shape."""
    n_rows = info.n_elements // info.shape[-1]
    raw = info.raw_bytes().numpy().reshape(n_rows, info.n_bytes // n_rows)
    return dequantize(raw, info.ggml_type).reshape(info.shape)


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "F16"])
@pytest.mark.parametrize("preset", TINY)
def test_reopens_with_llama_cpp_metadata_and_tensors(tmp_path: Path, preset: str, mix: str) -> None:
    shape = PRESETS[preset]
    path = write_synthetic_model(tmp_path / "m.gguf", preset, mix)
    gguf = open_gguf(path)
    md, arch = gguf.metadata, shape.arch
    assert gguf.architecture == arch
    assert md[f"{arch}.block_count"] == shape.n_layers
    assert md[f"{arch}.embedding_length"] == shape.hidden
    assert md[f"{arch}.feed_forward_length"] == shape.ffn
    assert md[f"{arch}.context_length"] == shape.context_length
    assert md[f"{arch}.attention.head_count"] == shape.n_heads
    assert md[f"{arch}.attention.head_count_kv"] == shape.n_kv_heads
    assert md[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(shape.rms_eps)
    assert md[f"{arch}.rope.freq_base"] == pytest.approx(shape.rope_base)
    assert md["general.file_type"] == MIXES[mix][1].value
    assert len(md["tokenizer.ggml.tokens"]) == shape.vocab_size
    if arch == "llama":
        assert md["llama.rope.dimension_count"] == shape.head_dim
    if arch in ("qwen3", "gemma3"):
        assert md[f"{arch}.attention.key_length"] == shape.head_dim
        assert md[f"{arch}.attention.value_length"] == shape.head_dim
    if arch == "gemma3":
        assert md["gemma3.attention.sliding_window"] == shape.sliding_window

    expected_types = tensor_types(preset, mix)
    plan = {spec.name: spec.shape for spec in tensor_plan(shape)}
    assert set(gguf.tensors) == set(plan)
    for name, info in gguf.tensors.items():
        assert info.shape == plan[name], name
        assert info.ggml_type == expected_types[name], name
    names = set(gguf.tensors)
    assert ("output.weight" in names) != shape.tied_embeddings
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("blk.0.attn_k_norm.weight" in names) == (arch in ("qwen3", "gemma3"))
    assert ("blk.0.post_ffw_norm.weight" in names) == (arch == "gemma3")


def test_q4_k_m_follows_llama_cpp_for_llama3_8b() -> None:
    types = tensor_types("llama3-8b", "Q4_K_M")
    assert Counter(t.name for t in types.values()) == {"Q4_K": 193, "Q6_K": 33, "F32": 65}
    assert types["token_embd.weight"] == T.Q4_K
    assert types["output.weight"] == T.Q6_K
    more_bits = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for role in ("attn_v", "ffn_down"):
        q6 = [i for i in range(32) if types[f"blk.{i}.{role}.weight"] == T.Q6_K]
        assert q6 == more_bits, role


def test_q4_k_m_matches_the_real_gemma3_270m_file(default_model_path: Path) -> None:
    """The default model was quantized by llama.cpp: its types include every row fallback."""
    real = {name: info.ggml_type for name, info in open_gguf(default_model_path).tensors.items()}
    assert tensor_types("gemma3-270m", "Q4_K_M") == real


def test_override_mapping_beats_the_base_mix() -> None:
    mix = {"base": "Q4_K_M", "blk.*.ffn_down.weight": "Q8_0", "output.weight": "f16"}
    types = tensor_types("tiny-llama", mix)
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == T.Q8_0
    assert types["output.weight"] == T.F16
    assert types["blk.0.ffn_up.weight"] == T.Q4_K
    assert types["blk.0.attn_norm.weight"] == T.F32


@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "BF16"])
def test_weights_decode_to_finite_values_of_trained_magnitude(tmp_path: Path, mix: str) -> None:
    gguf = open_gguf(write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", mix))
    seen = set()
    for info in gguf:
        values = _values(info)
        assert np.isfinite(values).all(), info.name
        if len(info.shape) == 2:
            seen.add(info.ggml_type)
            assert abs(float(values.mean())) < 0.005, info.name
            assert 0.7 * WEIGHT_STD < float(values.std()) < 1.3 * WEIGHT_STD, info.name
            assert len(np.unique(values[:, :32], axis=0)) == info.shape[0], "rows repeat"
        else:
            assert abs(float(values.mean()) - 1.0) < 0.05, info.name
    assert seen >= {MIXES[mix][0]}


def test_qwen2_biases_are_small(tmp_path: Path) -> None:
    gguf = open_gguf(write_synthetic_model(tmp_path / "m.gguf", "tiny-qwen2", "Q8_0"))
    bias = _values(gguf.tensor("blk.0.attn_q.bias"))
    assert 0.5 * WEIGHT_STD < float(bias.std()) < 1.5 * WEIGHT_STD


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = write_synthetic_model(tmp_path / "a.gguf", "tiny-qwen3", "Q4_K_M", seed=1).read_bytes()
    b = write_synthetic_model(tmp_path / "b.gguf", "tiny-qwen3", "Q4_K_M", seed=1).read_bytes()
    c = write_synthetic_model(tmp_path / "c.gguf", "tiny-qwen3", "Q4_K_M", seed=2).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


def test_sparse_fill_writes_a_hole_of_the_right_size_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    sparse = write_synthetic_model(tmp_path / "s.gguf", "tinyllama-1.1b", "Q4_K_M", fill="sparse")
    seconds = time.perf_counter() - start
    gguf = open_gguf(sparse)
    last = max(gguf.tensors.values(), key=lambda t: t.file_offset)
    size = sparse.stat().st_size
    assert last.file_offset + last.n_bytes <= size < last.file_offset + last.n_bytes + 32
    assert gguf.tensor_bytes > 600e6  # 1.1B parameters at ~4.9 bits
    assert sparse.stat().st_blocks * 512 < 16e6  # only the header is on disk
    assert seconds < 10
    assert not gguf.tensor("output.weight").raw_bytes()[:4096].any()


def test_sparse_and_random_fills_lay_out_the_same_file(tmp_path: Path) -> None:
    sparse = open_gguf(
        write_synthetic_model(tmp_path / "s.gguf", "tiny-gemma3", "Q4_K_M", fill="sparse")
    )
    full = open_gguf(write_synthetic_model(tmp_path / "r.gguf", "tiny-gemma3", "Q4_K_M"))
    assert sparse.file_size == full.file_size
    assert [(t.name, t.file_offset) for t in sparse] == [(t.name, t.file_offset) for t in full]


def test_synthetic_bpe_vocab_is_consistent(tmp_path: Path) -> None:
    md = open_gguf(write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", fill="sparse")).metadata
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == len(set(tokens)) == PRESETS["tiny-llama"].vocab_size
    assert md["tokenizer.ggml.model"] == "gpt2"
    known = set(tokens)
    for merge in md["tokenizer.ggml.merges"]:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= known
    assert "Ġ" in known and "a" in known  # space and letters: any text encodes
    assert md["tokenizer.ggml.token_type"][md["tokenizer.ggml.eos_token_id"]] == 3


def test_synthetic_spm_vocab_has_byte_fallback(tmp_path: Path) -> None:
    md = open_gguf(
        write_synthetic_model(tmp_path / "m.gguf", "tiny-gemma3", fill="sparse")
    ).metadata
    tokens = md["tokenizer.ggml.tokens"]
    assert md["tokenizer.ggml.model"] == "llama"
    assert len(tokens) == len(set(tokens)) == PRESETS["tiny-gemma3"].vocab_size
    assert {f"<0x{b:02X}>" for b in range(256)} <= set(tokens)
    assert len(md["tokenizer.ggml.scores"]) == len(md["tokenizer.ggml.token_type"]) == len(tokens)


def test_copied_vocab_sets_the_vocab_size(tmp_path: Path, vocab_dir: Path) -> None:
    source = vocab_dir / "ggml-vocab-qwen2.gguf"
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-qwen2", vocab=source, fill="sparse")
    gguf = open_gguf(path)
    expected = {k: v for k, v in open_gguf(source).metadata.items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in gguf.metadata.items() if k.startswith("tokenizer.")} == expected
    assert gguf.tensor("token_embd.weight").shape == (151936, PRESETS["tiny-qwen2"].hidden)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "llama-9000"}, "unknown model shape"),
        ({"mix": "Q7_K"}, "unknown mix"),
        ({"mix": {"output.weight": "IQ2_XXS"}}, "unsupported tensor type"),
        ({"fill": "zeros"}, "unknown fill"),
        ({"vocab": "/nonexistent/vocab.gguf"}, "no such file"),
        ({"shape": replace(PRESETS["tiny-llama"], vocab_size=200), "vocab": "spm"}, "286 tokens"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"shape": "tiny-llama", "mix": "Q8_0", **kwargs}
    with pytest.raises(MetallicError, match=message) as err:
        write_synthetic_model(tmp_path / "m.gguf", **args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_kv_heads": 3}, "not a multiple"),
        ({"arch": "gpt2"}, "unknown architecture"),
        ({"sliding_window": 64}, "only gemma3"),
        ({"qkv_bias": True}, "only qwen2"),
        ({"hidden": 0}, "must be positive"),
    ],
)
def test_impossible_shapes_are_rejected(change: dict, message: str) -> None:
    with pytest.raises(MetallicError, match=message):
        replace(PRESETS["tiny-llama"], **change)


def test_cli_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert main([str(out), "--shape", "tiny-qwen3", "--mix", "Q5_K_M", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and " s" in printed
    assert open_gguf(out).metadata["general.file_type"] == MIXES["Q5_K_M"][1].value
    assert main([str(out), "--shape", "nope"]) == 2
    assert "unknown model shape" in capsys.readouterr().err


def test_presets_have_the_published_dimensions() -> None:
    llama = PRESETS["llama3-8b"]
    assert (llama.n_layers, llama.hidden, llama.ffn, llama.n_heads, llama.n_kv_heads) == (
        32, 4096, 14336, 32, 8,
    )  # fmt: skip
    assert (llama.vocab_size, llama.rope_base) == (128256, 500000.0)
    gemma = PRESETS["gemma3-270m"]
    assert (gemma.n_layers, gemma.hidden, gemma.ffn, gemma.n_heads, gemma.n_kv_heads) == (
        18, 640, 2048, 4, 1,
    )  # fmt: skip
    assert (gemma.head_dim, gemma.vocab_size, gemma.sliding_window) == (256, 262144, 512)
    n_params = sum(math.prod(s.shape) for s in tensor_plan(llama))
    assert 8.0e9 < n_params < 8.1e9
