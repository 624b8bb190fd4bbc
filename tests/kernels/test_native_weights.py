"""The model running on native GGUF blocks through the Triton matmul (interpreter here) gives
the logits of the dense path: the op API hides which one runs."""

from __future__ import annotations

import pytest
import torch

from metallic.engine.engine import Engine
from metallic.ops.linear import LinearWeight
from metallic.testing.synthetic import write_synthetic_model


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q8_0", "Q5_0"])
def test_native_weights_match_dense(tmp_path, mix):
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", mix, seed=5)
    dense = Engine(path, device="cpu", dtype="f32", context_size=32)
    native = Engine(path, device="cpu", dtype="f32", context_size=32, native=True)
    layer = native.model.weights.layers[0]
    assert isinstance(layer.qkv, LinearWeight) and layer.qkv.dense is None
    assert len(layer.qkv.native or ()) == 3
    ids = dense.tokenizer.encode("native blocks")[:6]
    ref, got = dense.logits(ids).double(), native.logits(ids).double()
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 1e-4


def test_a_part_the_kernels_cannot_read_keeps_its_whole_stack_dense(tmp_path):
    mix = {"base": "Q8_0", "blk.*.attn_v.weight": "Q4_1"}  # Q4_1 has no native kernel
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", mix, seed=6)
    native = Engine(path, device="cpu", dtype="f32", context_size=32, native=True)
    layer = native.model.weights.layers[0]
    assert layer.qkv.dense is not None and layer.qkv.native is None
    assert layer.gate_up.native is not None and layer.gate_up.dense is None
    dense = Engine(path, device="cpu", dtype="f32", context_size=32)
    ids = dense.tokenizer.encode("mixed stack")[:4]
    ref, got = dense.logits(ids).double(), native.logits(ids).double()
    assert float((got - ref).norm() / ref.norm()) < 1e-4
