"""The whole model on the kernel path (native GGUF blocks, Triton norm/rope/activation, paged KV
cache and attention; the interpreter here) gives the logits and text of the torch path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.ops.linear import LinearWeight
from metallic.runtime.batch import SequenceChunk
from metallic.runtime.kv_cache import PagedKVCache
from metallic.testing.synthetic import PRESETS, write_synthetic_model


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize(
    ("preset", "mix"),
    [("tiny-llama", "Q4_K_M"), ("tiny-qwen2", "Q5_0"), ("tiny-gemma3", "Q4_K_M")],
)
def test_kernel_path_matches_torch_path(tmp_path, monkeypatch, preset, mix):
    path = write_synthetic_model(tmp_path / "m.gguf", preset, mix, seed=5)
    torch_path = Engine(path, device="cpu", dtype="f32", context_size=40)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    kernels = Engine(path, device="cpu", dtype="f32", context_size=40)
    assert isinstance(kernels.cache, PagedKVCache)
    layer = kernels.model.weights.layers[0]
    assert isinstance(layer.qkv, LinearWeight) and layer.qkv.dense is None
    assert kernels.model.weights.embedding.native is not None
    # Spans two KV blocks, and (gemma3) the sliding window of the tiny preset.
    ids = torch_path.tokenizer.encode("native blocks and paged attention, " * 4)[:20]
    ref, got = torch_path.logits(ids), kernels.logits(ids)
    assert torch.isfinite(got).all()
    # The torch path keeps its embedding/output matrix in f16 on the CPU (3e-4 of rounding).
    assert _relative(got, ref) < 1e-3


def test_kernel_decode_matches_torch_decode(tmp_path, monkeypatch):
    """Decode steps (the split-K attention kernel, GEMVs) past a sliding window, on two
    gemma3 layers: interpreted decode steps are slow, so the model is as small as it gets."""
    shape = dataclasses.replace(PRESETS["tiny-gemma3"], n_layers=2)
    path = write_synthetic_model(tmp_path / "m.gguf", shape, "Q8_0", seed=7)
    torch_path = Engine(path, device="cpu", dtype="f32", context_size=40)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    kernels = Engine(path, device="cpu", dtype="f32", context_size=40)
    prompt = torch_path.tokenizer.encode("a sliding window of sixteen tokens, " * 4)[:18]
    assert greedy(kernels, prompt, 3) == greedy(torch_path, prompt, 3)


def greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(ids, params)]


def test_a_part_the_kernels_cannot_read_keeps_its_whole_stack_dense(tmp_path, monkeypatch):
    mix = {"base": "Q8_0", "blk.*.attn_v.weight": "Q4_1"}  # Q4_1 has no native kernel
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", mix, seed=6)
    dense = Engine(path, device="cpu", dtype="f32", context_size=32)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    native = Engine(path, device="cpu", dtype="f32", context_size=32)
    layer = native.model.weights.layers[0]
    assert layer.qkv.dense is not None and layer.qkv.native is None
    assert layer.gate_up.native is not None and layer.gate_up.dense is None
    assert len(layer.gate_up.native) == 1  # gate and up share a format: one block matrix
    ids = dense.tokenizer.encode("mixed stack")[:4]
    assert _relative(native.logits(ids), dense.logits(ids)) < 1e-3


def test_padded_prompt_chunk_gives_the_unpadded_logits(tmp_path, monkeypatch):
    """A prompt chunk topped up with a filler sequence (how a captured prefill graph serves any
    length up to its bucket) yields the same logits for the real sequence."""
    shape = dataclasses.replace(PRESETS["tiny-gemma3"], n_layers=2)
    path = write_synthetic_model(tmp_path / "m.gguf", shape, "Q8_0", seed=8)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    engine = Engine(path, device="cpu", dtype="f32", context_size=64)
    cache, model = engine.cache, engine.model
    assert isinstance(cache, PagedKVCache)
    tokens = engine.tokenizer.encode("padding must not leak into a sequence")[:11]
    slot = cache.allocate()
    plain = model.forward(cache.batch([SequenceChunk(slot, 0, tokens)]), cache)
    padded_batch = cache.batch([SequenceChunk(slot, 0, tokens)], pad_to=16)
    assert padded_batch.n_tokens == 16 and len(padded_batch.chunks) == 2
    padded = model.forward(padded_batch, cache)
    assert padded.shape[0] == 2
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-5, atol=1e-5)
