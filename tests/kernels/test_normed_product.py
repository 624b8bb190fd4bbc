"""The FMA mode's RMS-norm prologue (x given as a `NormInput`) against the two launches it
replaces, kernels.norm's rms_norm then quant_matmul: the same bits, in the interpreter, for the
product and for the new residual that rms_norm writes in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels import prepare_weight, quant_matmul
from metallic.kernels.norm import rms_norm
from metallic.kernels.quant_matmul import NormInput
from metallic.quant.quantize import quantize

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
