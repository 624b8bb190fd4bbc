"""quant_gemm (the prefill tensor-core GEMM) against float64 products of the reference
dequantizer's weights, in the interpreter at small shapes and tiles."""

from __future__ import annotations

import dataclasses
import importlib
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels import prepare_weight
from metallic.kernels.quant_gemm import GEMM_ROWS, GemmTile, gemm_takes, quant_gemm, uses_gemm
from metallic.quant.quantize import quantize
from metallic.quant.reference import dequantize

T = GGMLQuantizationType
quant_gemm_module = importlib.import_module("metallic.kernels.quant_gemm")
SMALL = GemmTile(bm=16, bn=32, bk=128, warps=4, stages=2)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _weight(qtype: GGMLQuantizationType, n: int, k: int, seed: int):
    """A packed [n, k] matrix quantized from normal values, and its reference dequantization."""
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
    return prepare_weight(raw, qtype, n, k), dequantize(raw, qtype, n * k).view(n, k)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many 16-bit floats lie between a and b (same dtype and signs; -0 counts as 0)."""
    bits = tuple((t + 0.0).view(torch.int16).int() for t in (a, b))
    return (bits[0] - bits[1]).abs()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_are_the_reference_rounded(qtype: GGMLQuantizationType, dtype: torch.dtype) -> None:
    """x = I reads the weights back as the kernel feeds them to the tensor cores: the reference
    dequantization rounded to x's type (at most one unit in the last place apart, where the
    kernel's fused multiply-add rounds once less), for every step size."""
    k = 512
    weight, dense = _weight(qtype, 24, k, _seed())
    x = torch.eye(k, dtype=dtype)
    expected = dense.to(dtype)
    for bk, w_as_b in ((64, False), (128, True), (256, False)):
        tile = GemmTile(bm=64, bn=16, bk=bk, warps=4, stages=2, w_as_b=w_as_b)
        got = quant_gemm(x, weight, tile=tile).T
        apart = _ulps_apart(got, expected)
        assert apart.max() <= 1 and (apart == 0).float().mean() > 0.99, (qtype.name, bk)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_product_matches_float64(qtype: GGMLQuantizationType) -> None:
    """Ragged M and N (tiles past both ends), three super-blocks of K, written into a column
    slice of a wider output: x @ W.T within bf16 rounding of the float64 product, and no
    worse than dequantizing to bf16 and multiplying (the path the kernel replaces); W as
    either operand gives the same result."""
    seed = _seed()
    n, k, m = 40, 768, 20
    weight, dense = _weight(qtype, n, k, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    ref = x.double() @ dense.double().T
    wide = torch.zeros(m, n + 8, dtype=torch.bfloat16)
    out = quant_gemm(x, weight, tile=SMALL, out=wide[:, 4 : 4 + n])
    assert out.data_ptr() == wide[:, 4:].data_ptr()
    assert torch.equal(wide[:, :4], torch.zeros(m, 4, dtype=torch.bfloat16))
    assert torch.equal(wide[:, 4 + n :], torch.zeros(m, 4, dtype=torch.bfloat16))
    today = x @ dense.to(torch.bfloat16).T
    today_err = ((today.double() - ref).norm() / ref.norm()).item()
    w_as_b = quant_gemm(x, weight, tile=dataclasses.replace(SMALL, w_as_b=True))
    for got in (out, w_as_b):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2 and err < 2 * today_err, f"{err:.3g} vs {today_err:.3g} (seed {seed})"


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_a_grid_of_few_tiles_splits_k(
    qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tile of out (fewer programs than the interpreter's two multiprocessors): K is split
    in two, the f32 partial sums added by a second kernel; the same product."""
    seed = _seed()
    n, k, m = 24, 512, 12
    weight, dense = _weight(qtype, n, k, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    merges: list[int] = []
    real = quant_gemm_module.sum_splits
    monkeypatch.setattr(
        quant_gemm_module, "sum_splits", lambda p, o: merges.append(len(p)) or real(p, o)
    )
    out = quant_gemm(x, weight, tile=GemmTile(bm=16, bn=32, bk=64, warps=4, stages=2))
    assert merges == [2]
    ref = x.double() @ dense.double().T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, f"error {err:.3g} (seed {seed})"


def test_bad_input_is_a_clear_error() -> None:
    weight, _ = _weight(T.Q4_K, 16, 256, _seed())
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    with pytest.raises(MetallicError, match="bf16 or f16"):
        quant_gemm(x.float(), weight)
    with pytest.raises(MetallicError, match="bf16 or f16"):
        quant_gemm(x[:, :128], weight)
    with pytest.raises(MetallicError, match="contiguous rows"):
        quant_gemm(x, weight, out=torch.empty(16, 4, dtype=torch.bfloat16).T)
    q8, _ = _weight(T.Q8_0, 16, 256, _seed())
    with pytest.raises(MetallicError, match="Q4_K and Q6_K"):
        quant_gemm(x, q8)
    with pytest.raises(MetallicError, match="bk"):
        GemmTile(bm=16, bn=16, bk=32, warps=4, stages=2)
    with pytest.raises(MetallicError, match="bn"):
        GemmTile(bm=16, bn=48, bk=64, warps=4, stages=2)


def test_uses_gemm_where_a_part_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit rows within GEMM_ROWS of some part's format (Q4_K's today), against a part of at
    least GEMM_MIN_WEIGHTS weights."""
    q4, q6, q8 = (_weight(t, 8, 256, _seed())[0] for t in (T.Q4_K, T.Q6_K, T.Q8_0))
    low, high = GEMM_ROWS[T.Q4_K]
    assert not uses_gemm(low, (q4,), torch.bfloat16)  # 2048 weights: a small matrix
    monkeypatch.setattr(quant_gemm_module, "GEMM_MIN_WEIGHTS", 8 * 256)
    assert uses_gemm(low, (q4,), torch.bfloat16) and uses_gemm(high, (q4, q6), torch.float16)
    assert uses_gemm(512, (q8, q4), torch.bfloat16)
    assert not uses_gemm(low - 1, (q4,), torch.bfloat16)
    assert not uses_gemm(high + 1, (q4,), torch.bfloat16)
    assert not uses_gemm(512, (q4,), torch.float32)
    assert not uses_gemm(512, (q8,), torch.bfloat16)
    assert gemm_takes(low, q4, torch.float16) and not gemm_takes(low, q8, torch.float16)
