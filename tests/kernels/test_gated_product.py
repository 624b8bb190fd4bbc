"""A gated MLP's [gate | up] product with the activation applied in the product's own FMA kernel
(one row of x), against the product then `gated_activation`: the same bits, in the interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels import prepare_weight, quant_matmul
from metallic.kernels.activation import gated_activation
from metallic.ops.linear import LinearWeight, fuses_gate, gated_linear, linear
from metallic.quant.quantize import quantize

T = GGMLQuantizationType


def _packed(qtype: GGMLQuantizationType, n: int, k: int, seed: int):
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    if qtype in (T.F16, T.BF16):
        dtype = torch.float16 if qtype == T.F16 else torch.bfloat16
        raw = torch.from_numpy(values).to(dtype).view(torch.uint8).reshape(-1)
    else:
        raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
    return prepare_weight(raw, qtype, n, k)


@pytest.mark.parametrize(
    ("qtype", "f", "k", "dtype", "kind", "steps_per_split"),
    [
        (T.Q5_0, 40, 640, torch.bfloat16, "gelu_tanh", None),  # Gemma 3's gate|up, GeGLU
        (T.Q8_0, 37, 640, torch.bfloat16, "gelu_tanh", None),  # F no multiple of a program's
        (T.Q4_K, 24, 512, torch.float16, "silu", None),
        (T.Q6_K, 21, 512, torch.float32, "silu", 1),  # split K: the merge applies it
        (T.Q4_0, 16, 96, torch.float16, "silu", None),  # K ends inside a step
    ],
)
def test_gated_product_gives_the_separate_bits(
    qtype: GGMLQuantizationType,
    f: int,
    k: int,
    dtype: torch.dtype,
    kind: str,
    steps_per_split: int | None,
) -> None:
    weight = _packed(qtype, 2 * f, k, seed=f)
    x = (torch.randn(1, k) * 2).to(dtype)
    args = (weight, qtype, 2 * f, k)
    fused = quant_matmul(x, *args, gated=kind, steps_per_split=steps_per_split)
    gate_up = quant_matmul(x, *args, steps_per_split=steps_per_split)
    separate = gated_activation(gate_up, None, kind)
    assert fused.shape == (1, f) and not separate.isnan().any()
    assert torch.equal(fused, separate)


def test_gated_linear_where_it_fuses(monkeypatch) -> None:
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    f, k = 24, 256
    packed = _packed(T.Q4_K, 2 * f, k, seed=3)
    weight = LinearWeight((T.Q4_K,), (2 * f,), k, native=(packed,))
    x = torch.randn(1, 1, k)
    assert fuses_gate(x, weight)
    separate = gated_activation(linear(x, weight), None, "silu")
    assert torch.equal(gated_linear(x, weight, "silu"), separate)
    assert not fuses_gate(torch.randn(3, k), weight)  # rows: the DOT mode, activation after
    assert not fuses_gate(x, weight, act_rounded=(torch.empty(0),))  # a dp4a product follows
    two_parts = LinearWeight((T.Q4_K, T.Q4_K), (f, f), k, native=(packed, packed))
    assert not fuses_gate(x, two_parts)
    biased = LinearWeight((T.Q4_K,), (2 * f,), k, native=(packed,), bias=torch.zeros(2 * f))
    assert not fuses_gate(x, biased)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "0")
    assert not fuses_gate(x, weight)  # the torch path


def test_gated_product_rejects_what_it_cannot_fuse() -> None:
    weight = _packed(T.Q8_0, 8, 64, seed=1)
    with pytest.raises(MetallicError, match="one row"):
        quant_matmul(torch.randn(2, 64), weight, T.Q8_0, 8, 64, gated="silu")
    with pytest.raises(MetallicError, match="relu"):
        quant_matmul(torch.randn(1, 64), weight, T.Q8_0, 8, 64, gated="relu")
    odd = _packed(T.Q8_0, 7, 64, seed=2)
    with pytest.raises(MetallicError, match="even"):
        quant_matmul(torch.randn(1, 64), odd, T.Q8_0, 7, 64, gated="silu")
    dense = _packed(T.F16, 8, 256, seed=2)
    with pytest.raises(MetallicError, match="F16"):
        quant_matmul(torch.randn(1, 256), dense, T.F16, 8, 256, gated="silu")
    with pytest.raises(MetallicError, match=r"\[1, 4\]"):
        quant_matmul(torch.randn(1, 64), weight, T.Q8_0, 8, 64, gated="silu",
                     out=torch.empty(1, 8))  # fmt: skip
