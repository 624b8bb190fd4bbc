"""The FMA mode's RMS-norm prologue (x given as a `NormInput`) against the two launches it
replaces, kernels.norm's rms_norm then quant_matmul: the same bits, in the interpreter, for the
product and for the new residual that rms_norm writes in place."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.scheduler import Chunk
from metallic.engine.sequence import Sequence
from metallic.errors import MetallicError
from metallic.kernels import NormInput, prepare_weight, quant_matmul
from metallic.kernels.norm import rms_norm
from metallic.models import transformer
from metallic.ops.linear import LinearWeight, fuses_norm, linear, normed_linear
from metallic.ops.norm import rms_norm as ops_rms_norm
from metallic.quant.quantize import quantize
from metallic.testing.synthetic import PRESETS, write_synthetic_model

T = GGMLQuantizationType
EPS = 1e-6


def _packed(qtype: GGMLQuantizationType, n: int, k: int, seed: int):
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    if qtype == T.F16:
        raw = torch.from_numpy(values).to(torch.float16).view(torch.uint8).reshape(-1)
    else:
        raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
    return prepare_weight(raw, qtype, n, k)


def _operands(k: int, dtype: torch.dtype, pre: bool, residual: bool, seed: int):
    """delta (a block's output in `dtype`, or the f32 embedding row where nothing is added),
    the f32 residual, post-norm and norm weights near 1 as in Gemma's files."""
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(1, k, generator=gen) * 3).to(dtype if residual else torch.float32)
    x = torch.randn(1, k, generator=gen) * 5 if residual else None
    pre_weight = 1 + 0.2 * torch.randn(k, generator=gen) if pre else None
    weight = 1 + 0.2 * torch.randn(k, generator=gen)
    return delta, x, pre_weight, weight


@pytest.mark.parametrize(
    ("qtype", "n", "k", "dtype", "pre", "residual", "gated", "steps_per_split"),
    [
        (T.Q5_0, 40, 640, torch.bfloat16, True, True, None, None),  # Gemma's q|k after a block
        (T.Q8_0, 24, 640, torch.bfloat16, True, True, None, 1),  # its v; split K
        (T.Q5_0, 48, 640, torch.bfloat16, True, True, "gelu_tanh", None),  # its gate|up
        (T.Q5_0, 48, 640, torch.float16, True, True, "gelu_tanh", 1),  # split: merge gates
        (T.Q4_K, 36, 256, torch.bfloat16, False, False, None, None),  # layer 0: the embedding
        (T.Q6_K, 20, 256, torch.float16, False, True, "silu", None),  # no post-norm
        # f32 activations: no rounding of x hides a last-bit difference in the norm
        (T.Q8_0, 37, 256, torch.float32, True, True, None, None),
        (T.Q4_K, 32, 512, torch.float32, True, True, "silu", 1),
    ],
)
def test_normed_product_gives_the_two_launches_bits(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    dtype: torch.dtype,
    pre: bool,
    residual: bool,
    gated: str | None,
    steps_per_split: int | None,
) -> None:
    weight = _packed(qtype, n, k, seed=n + k)
    delta, x, pre_weight, norm_weight = _operands(k, dtype, pre, residual, seed=n)
    updated = None if x is None else x.clone()
    h = rms_norm(delta, norm_weight, EPS, updated, dtype, pre_weight)
    args = (weight, qtype, n, k)
    separate = quant_matmul(h, *args, gated=gated, steps_per_split=steps_per_split)
    new_residual = None if x is None else torch.full_like(x, float("nan"))
    norm = NormInput(delta, norm_weight, EPS, dtype, x, pre_weight, new_residual)
    fused = quant_matmul(norm, *args, gated=gated, steps_per_split=steps_per_split)
    assert fused.dtype == dtype and not separate.isnan().any()
    assert torch.equal(fused, separate)
    if x is not None:
        assert not torch.equal(updated, x)  # the add happened, and not in x itself
        assert torch.equal(new_residual, updated)


def test_normed_product_leaves_the_residual_alone_without_an_output() -> None:
    """A second part of a stacked weight reads the same residual and stores no sum."""
    k = 256
    weight = _packed(T.Q8_0, 16, k, seed=1)
    delta, x, pre_weight, norm_weight = _operands(k, torch.bfloat16, True, True, seed=2)
    before = x.clone()
    updated = x.clone()
    h = rms_norm(delta, norm_weight, EPS, updated, torch.bfloat16, pre_weight)
    norm = NormInput(delta, norm_weight, EPS, torch.bfloat16, x, pre_weight)
    fused = quant_matmul(norm, weight, T.Q8_0, 16, k)
    assert torch.equal(fused, quant_matmul(h, weight, T.Q8_0, 16, k))
    assert torch.equal(x, before)


def test_normed_product_rejects_what_it_cannot_compute() -> None:
    k = 256
    weight = _packed(T.Q8_0, 8, k, seed=1)
    delta, x, pre_weight, norm_weight = _operands(k, torch.bfloat16, True, True, seed=3)

    def run(**changes: object) -> None:
        fields = {"delta": delta, "weight": norm_weight, "eps": EPS, "dtype": torch.bfloat16,
                  "residual": x, "pre_weight": pre_weight} | changes  # fmt: skip
        quant_matmul(NormInput(**fields), weight, T.Q8_0, 8, k)  # type: ignore[arg-type]

    with pytest.raises(MetallicError, match="in memory of its own"):
        run(new_residual=x)
    with pytest.raises(MetallicError, match="needs a residual"):
        run(residual=None, new_residual=torch.empty_like(x))
    with pytest.raises(MetallicError, match=r"NormInput\.weight"):
        run(weight=norm_weight.half())
    with pytest.raises(MetallicError, match=r"NormInput\.delta"):
        run(delta=torch.randn(2, k))
    with pytest.raises(MetallicError, match=r"NormInput\.dtype"):
        run(dtype=torch.int8)
    dense = _packed(T.F16, 8, k, seed=2)
    with pytest.raises(MetallicError, match="F16"):
        quant_matmul(NormInput(delta, norm_weight, EPS, torch.bfloat16), dense, T.F16, 8, k)


def test_normed_linear_over_stacked_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma's q|k (Q5_0) and v (Q8_0): two launches, each making x, the first storing the sum;
    the product and residual of rms_norm then linear, bit for bit."""
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    k = 256
    qk, v = _packed(T.Q5_0, 48, k, seed=4), _packed(T.Q8_0, 16, k, seed=5)
    weight = LinearWeight((T.Q5_0, T.Q8_0), (48, 16), k, native=(qk, v))
    delta, x, pre_weight, norm_weight = _operands(k, torch.bfloat16, True, True, seed=6)
    assert fuses_norm(delta, weight, torch.bfloat16)
    updated = x.clone()
    h = ops_rms_norm(delta, norm_weight, EPS, updated, torch.bfloat16, pre_weight)
    norm = NormInput(delta, norm_weight, EPS, torch.bfloat16, x, pre_weight)
    out, new_residual = normed_linear(norm, weight)
    assert out.shape == (1, 64) and torch.equal(out, linear(h, weight))
    assert torch.equal(new_residual, updated) and new_residual.data_ptr() != x.data_ptr()
    assert not fuses_norm(torch.randn(2, k), weight, torch.bfloat16)  # rows: no FMA mode
    dense = LinearWeight((T.F16,), (8,), k, native=(_packed(T.F16, 8, k, seed=7),))
    assert not fuses_norm(delta, dense, torch.bfloat16)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "0")
    assert not fuses_norm(delta, weight, torch.bfloat16)  # the torch path


def test_gemma_decode_logits_with_the_norms_fused(tmp_path, monkeypatch) -> None:
    """A decode step of a tiny Gemma 3 on the kernel path (q|k Q5_0, v Q8_0 as the 270M's
    Q4_K_M, bf16 activations) gives the same logits with its norms inside the products as with
    their own launches."""
    shape = dataclasses.replace(PRESETS["tiny-gemma3"], n_layers=2)
    mix = {"base": "Q4_K_M", "blk.*.attn_v.weight": "Q8_0"}  # the 270M's layer 0
    path = write_synthetic_model(tmp_path / "m.gguf", shape, mix, seed=9)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    engine = Engine(path, device="cpu", dtype="bf16", context_size=32)
    runner, model, store = engine.runner, engine.model, engine.store
    tokens = engine.tokenizer.encode("norms inside the products")[:6]
    seq = Sequence(0, 0, tokens, SamplingParams(), engine.tokenizer, len(store.n_blocks), 32)
    assert engine.blocks.reserve(seq, 0, len(tokens) + 1)
    model.forward(runner.prepare([Chunk(seq, 0, len(tokens))], None)[0], store)
    seq.token_ids.append(7)
    decode = [Chunk(seq, len(tokens), len(tokens) + 1)]
    fused_calls = []

    def counted(*args: object, **kwargs: object):
        fused_calls.append(args[1])
        return normed_linear(*args, **kwargs)

    monkeypatch.setattr(transformer, "normed_linear", counted)
    fused = model.forward(runner.prepare(decode, None)[0], store)
    layer = model.weights.layers[0]
    assert [w is layer.qkv for w in fused_calls[:2]] == [True, False]
    assert sum(w is layer.gate_up for w in fused_calls) == 1  # layer 0's
    assert [p.ggml_type for p in layer.qkv.native] == [T.Q5_0, T.Q8_0]  # two launches
    monkeypatch.setattr(transformer, "fuses_norm", lambda *args: False)
    separate = model.forward(runner.prepare(decode, None)[0], store)
    assert torch.isfinite(fused).all()
    assert torch.equal(fused, separate)
