"""The whole model on the kernel path (native GGUF blocks, Triton norm/rope/activation, paged KV
cache and attention; the interpreter here) gives the logits and text of the torch path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.scheduler import Chunk
from metallic.engine.sequence import Sequence
from metallic.ops.linear import LinearWeight
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


def test_padded_steps_give_the_unpadded_logits(tmp_path, monkeypatch):
    """A prompt chunk topped up with a filler sequence, and decode steps topped up with filler
    rows (how captured graphs serve any length up to their bucket), yield the same logits for
    the real sequences: the filler writes only the scratch blocks."""
    shape = dataclasses.replace(PRESETS["tiny-gemma3"], n_layers=2)
    path = write_synthetic_model(tmp_path / "m.gguf", shape, "Q8_0", seed=8)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    engine = Engine(path, device="cpu", dtype="f32", context_size=64)
    runner, model, store = engine.runner, engine.model, engine.store
    prompts = [
        engine.tokenizer.encode("padding must not leak into a sequence")[:n] for n in (11, 5, 8)
    ]
    seqs = []
    for i, tokens in enumerate(prompts):
        seq = Sequence(i, i, tokens, SamplingParams(), engine.tokenizer, len(store.n_blocks), 64)
        assert engine.blocks.reserve(seq, 0, len(tokens) + 1)
        seqs.append(seq)

    def run(chunks: list[Chunk], graphs: bool) -> torch.Tensor:
        runner.cuda_graphs = graphs  # prepare pads as for a graph (nothing is captured here)
        batch, graphed = runner.prepare(chunks, None)
        assert graphed == graphs
        return model.forward(batch, store)

    prefill = [Chunk(seqs[0], 0, 11)]
    plain, padded = run(prefill, False), run(prefill, True)
    assert padded.shape[0] == 2  # the sequence and the filler (16 tokens)
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-5, atol=1e-5)
    for seq in seqs[1:]:
        run([Chunk(seq, 0, len(seq.token_ids))], False)
    for seq in seqs:
        seq.token_ids.append(7)
    decode = [Chunk(seq, len(seq.token_ids) - 1, len(seq.token_ids)) for seq in seqs]
    plain, padded = run(decode, False), run(decode, True)
    assert padded.shape[0] == 4  # three sequences and a filler row
    torch.testing.assert_close(padded[:3], plain, rtol=1e-5, atol=1e-5)
