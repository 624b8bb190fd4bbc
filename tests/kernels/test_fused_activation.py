"""A gated MLP's activation applied inside the down product's FMA kernel (one row of x), against
`gated_activation` then the plain product: the same bits, in the interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels import prepare_weight, quant_matmul
from metallic.kernels.activation import gated_activation
from metallic.ops.linear import LinearWeight, linear
from metallic.quant.quantize import quantize

T = GGMLQuantizationType


def _packed(qtype: GGMLQuantizationType, n: int, k: int, seed: int):
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    if qtype in (T.F16, T.BF16):
        dtype = torch.float16 if qtype == T.F16 else torch.bfloat16
        raw = torch.from_numpy(values).to(dtype).view(torch.uint8).reshape(-1)
    else:
        raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
    return prepare_weight(raw, qtype, n, k)


@pytest.mark.parametrize(
    ("qtype", "k", "dtype", "kind", "steps_per_split"),
    [
        (T.Q8_0, 640, torch.bfloat16, "gelu_tanh", None),  # GeGLU in bf16, as Gemma 3
        (T.Q4_K, 512, torch.float16, "silu", None),
        (T.Q6_K, 512, torch.float32, "silu", 1),  # split K, the partial sums merged
        (T.Q5_0, 96, torch.float16, "gelu_tanh", None),  # K ends inside a step
    ],
)
def test_fused_activation_gives_the_unfused_bits(
    qtype: GGMLQuantizationType,
    k: int,
    dtype: torch.dtype,
    kind: str,
    steps_per_split: int | None,
) -> None:
    n = 40
    weight = _packed(qtype, n, k, seed=k)
    gate_up = (torch.randn(1, 2 * k) * 2).to(dtype)
    args = (weight, qtype, n, k)
    fused = quant_matmul(gate_up, *args, activation=kind, steps_per_split=steps_per_split)
    act = gated_activation(gate_up, None, kind)
    separate = quant_matmul(act, *args, steps_per_split=steps_per_split)
    assert not separate.isnan().any()
    assert torch.equal(fused, separate)


def test_linear_fuses_one_row_and_activates_first_otherwise(monkeypatch) -> None:
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    n, k = 24, 256
    packed = _packed(T.Q4_K, n, k, seed=3)
    weight = LinearWeight((T.Q4_K,), (n,), k, native=(packed,))
    for rows in (1, 3):  # one row: fused; three: gated_activation, then the product
        gate_up = torch.randn(rows, 2 * k)
        fused = linear(gate_up, weight, activation="silu")
        separate = linear(gated_activation(gate_up, None, "silu"), weight)
        assert torch.equal(fused, separate), rows


def test_fused_activation_rejects_what_it_cannot_fuse() -> None:
    weight = _packed(T.Q8_0, 8, 64, seed=1)
    with pytest.raises(MetallicError, match="one row"):
        quant_matmul(torch.randn(2, 128), weight, T.Q8_0, 8, 64, activation="silu")
    with pytest.raises(MetallicError, match="relu"):
        quant_matmul(torch.randn(1, 128), weight, T.Q8_0, 8, 64, activation="relu")
    with pytest.raises(MetallicError, match=r"\[M, 128\]"):
        quant_matmul(torch.randn(1, 64), weight, T.Q8_0, 8, 64, activation="silu")
    dense = _packed(T.F16, 8, 256, seed=2)
    with pytest.raises(MetallicError, match="F16"):
        quant_matmul(torch.randn(1, 512), dense, T.F16, 8, 256, activation="silu")
