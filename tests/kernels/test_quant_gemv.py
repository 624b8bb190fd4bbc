"""The dp4a decode kernels (metallic.kernels.quant_gemv) in the interpreter, where dp4a is emulated.

Two oracles: the product of the reference-dequantized matrix with x *as rounded to int8* (what the
kernel computes, so only float summation order differs), and with x itself (the rounding of x
costs under 1% relative, as llama.cpp's q8_1 path). Seeds are fresh each run and in messages.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.kernels import prepare_weight
from metallic.kernels.quant_gemv import DP4A_MAX_ROWS, Geometry, gemv, gemv_parts, quantize_x
from metallic.quant.quantize import quantize
from metallic.quant.reference import dequantize

T = GGMLQuantizationType


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _matrix(qtype: GGMLQuantizationType, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
    return raw, dequantize(raw, qtype, n * k).view(n, k).double()


def _rounded(xq: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """x as quantize_x rounded it, [M, K] in float64: what the kernels multiply."""
    return (xq[0].reshape(-1, 32).double() * xq[1].reshape(-1)[:, None].double()).view(-1, k)


def test_quantize_x_rounds_each_block_to_int8_with_its_scale() -> None:
    seed = _seed()
    x = torch.randn(256, generator=torch.Generator().manual_seed(seed)) * 3
    x[32:64] = 0  # an all-zero block has scale 0 and quants 0
    xq, dx, xs = quantize_x(x)
    blocks = x.view(-1, 32)
    expected_d = blocks.abs().amax(dim=1) / 127
    assert torch.allclose(dx, expected_d), seed
    restored = xq.view(-1, 32).double() * dx[:, None].double()
    assert ((restored - blocks.double()).abs() <= dx[:, None].double() / 2 + 1e-6).all(), seed
    assert xq.abs().max() <= 127
    assert torch.equal(xs, xq.view(-1, 16).sum(dim=1).float()), seed
    strided = torch.stack([x, x], dim=1)[:, 0]  # every other element of a wider buffer
    assert all(torch.equal(a, b) for a, b in zip(quantize_x(strided), (xq, dx, xs), strict=True))


def test_quantize_x_stacks_rows_each_rounded_as_alone() -> None:
    seed = _seed()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    xq, dx, xs = quantize_x(x)
    assert (xq.shape, dx.shape, xs.shape) == ((5, 96), (5, 3), (5, 6))
    for r in range(5):
        alone = quantize_x(x[r])
        assert all(torch.equal(a, b) for a, b in zip((xq[r], dx[r], xs[r]), alone, strict=True))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_x(torch.zeros(2, 3, 64))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
@pytest.mark.parametrize(
    ("n", "k", "geometry"),
    [
        (24, 512, Geometry(8, 2)),
        (21, 1024, Geometry(16, 4, splits=2)),
        (5, 768, Geometry(4, 1, splits=3)),
        (21, 1024, Geometry(8, 2, splits=2, kernel="staged")),
        (24, 512, Geometry(8, 2, kernel="tile")),
        (21, 1024, Geometry(16, 4, splits=2, kernel="tile")),
    ],
)
def test_gemv_matches_the_reference(
    qtype: GGMLQuantizationType, n: int, k: int, geometry: Geometry
) -> None:
    seed = _seed()
    raw, dense = _matrix(qtype, n, k, seed)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed + 1)).to(torch.float16)
    xq = quantize_x(x[0])
    out = torch.empty(1, n, dtype=torch.float16)
    gemv(xq, prepare_weight(raw, qtype, n, k), out, geometry)
    assert not out.isnan().any(), f"an output was never written (seed {seed})"
    exact = _rounded(xq, k) @ dense.T
    err = ((out.double() - exact).norm() / exact.norm()).item()
    assert err < 1e-3, f"{qtype.name} vs rounded x: {err:.3g} (seed {seed})"  # f16 output
    # Against x itself the rounding's own error remains: 0.6% on average, over 5% in one draw of
    # a thousand at five rows; a wrong kernel is off by order one.
    ref = x.double() @ dense.T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 0.1, f"{qtype.name} vs x: {err:.3g} (seed {seed})"


@pytest.mark.parametrize(
    ("qtype", "geometry"),
    [
        (T.Q4_K, Geometry(16, 1, splits=2)),
        (T.Q4_K, Geometry(16, 2, kernel="staged")),
        (T.Q6_K, Geometry(16, 2)),
        (T.Q6_K, Geometry(16, 1, splits=2)),
    ],
)
def test_gemv_takes_rows_of_x_each_summed_as_alone(
    qtype: GGMLQuantizationType, geometry: Geometry
) -> None:
    """M rows of x in one pass (1, 2, 3, 5, 8; N = 13 ends inside the program, K in one or two
    splits): each row's result is x W^T with x as rounded, and the same bits whether the row
    is multiplied alone or among others. Q6_K from 5 rows loads its quants half by half."""
    seed = _seed()
    n, k = 13, 512
    raw, dense = _matrix(qtype, n, k, seed)
    weight = prepare_weight(raw, qtype, n, k)
    x = torch.randn(DP4A_MAX_ROWS, k, generator=torch.Generator().manual_seed(seed + 1))
    xq = quantize_x(x.to(torch.bfloat16))
    exact = _rounded(xq, k) @ dense.T
    results = {}
    for m in (1, 2, 3, 5, DP4A_MAX_ROWS):
        out = torch.empty(m, n, dtype=torch.float32)
        gemv(tuple(t[:m] for t in xq), weight, out, geometry)
        err = ((out.double() - exact[:m]).norm() / exact[:m].norm()).item()
        assert err < 1e-5, f"{qtype.name} M={m}: {err:.3g} (seed {seed})"  # f32 output
        results[m] = out
    for m, out in results.items():
        assert torch.equal(out, results[DP4A_MAX_ROWS][:m]), f"M={m} (seed {seed})"
    last = torch.empty(1, n, dtype=torch.float32)
    gemv(tuple(t[-1:] for t in xq), weight, last, geometry)
    assert torch.equal(last, results[DP4A_MAX_ROWS][-1:]), f"the last row alone (seed {seed})"


def test_gemv_rejects_rows_it_does_not_take() -> None:
    raw, _ = _matrix(T.Q4_K, 8, 256, _seed())
    weight = prepare_weight(raw, T.Q4_K, 8, 256)
    x = quantize_x(torch.randn(DP4A_MAX_ROWS + 1, 256))
    with pytest.raises(ValueError, match="rows"):
        gemv(x, weight, torch.empty(DP4A_MAX_ROWS + 1, 8))
    with pytest.raises(ValueError, match="one row"):
        gemv(tuple(t[:2] for t in x), weight, torch.empty(2, 8), Geometry(8, 1, kernel="tile"))


@pytest.mark.parametrize(
    ("kinds", "geometry", "launches", "m"),
    [
        (((T.Q4_K, 32), (T.Q4_K, 24)), None, 1, 2),  # gate|up: one launch of the default
        (((T.Q4_K, 32), (T.Q4_K, 24)), Geometry(16, 4, splits=2, kernel="staged"), 1, 1),
        (((T.Q4_K, 20), (T.Q4_K, 16)), None, 2, 3),  # the first part's rows end in a program
        (((T.Q6_K, 16), (T.Q4_K, 16), (T.Q4_K, 8)), Geometry(8, 8), 2, 1),  # v, then a pair
    ],
)
def test_gemv_parts_stacks_the_products(
    kinds: tuple, geometry: Geometry | None, launches: int, m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts side by side in out's columns, for m rows of x (out's rows a stride apart)."""
    from metallic.kernels import quant_gemv

    seed = _seed()
    k = 2048  # 8 super-blocks: the default geometry takes 8 rows
    matrices = [_matrix(qtype, n, k, seed + i) for i, (qtype, n) in enumerate(kinds)]
    parts = [
        prepare_weight(raw, qtype, n, k)
        for (raw, _), (qtype, n) in zip(matrices, kinds, strict=True)
    ]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 9)).to(torch.bfloat16)
    xq = quantize_x(x)
    calls = []
    real_launch = quant_gemv._launch
    monkeypatch.setattr(quant_gemv, "_launch", lambda *a: calls.append(1) or real_launch(*a))
    out = torch.full((m, sum(n for _, n in kinds)), float("nan"), dtype=torch.bfloat16)
    gemv_parts(xq, parts, out, geometry)
    assert len(calls) == launches
    exact = _rounded(xq, k) @ torch.cat([dense for _, dense in matrices]).T
    err = ((out.double() - exact).norm() / exact.norm()).item()
    assert err < 1e-2, f"{err:.3g} (seed {seed})"  # bf16 output


@pytest.mark.parametrize("m", [1, 2])
def test_linear_takes_the_dp4a_kernels_for_rows_of_large_k_quants(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacked Q4_K | Q6_K parts (q|k|v-like) with the measured default geometry; m rows of x
    rounded once for both. The size threshold is lowered so the interpreter's small shapes
    qualify."""
    from metallic.kernels import quant_gemv
    from metallic.ops.linear import LinearWeight, linear, rounding_buffers

    seed = _seed()
    k = 512
    raws, denses, packed = [], [], []
    for i, (qtype, n) in enumerate(((T.Q4_K, 40), (T.Q6_K, 24))):
        raw, dense = _matrix(qtype, n, k, seed + i)
        raws.append(raw)
        denses.append(dense)
        packed.append(prepare_weight(raw, qtype, n, k))
    weight = LinearWeight((T.Q4_K, T.Q6_K), (40, 24), k, native=tuple(packed))
    calls = []
    monkeypatch.setattr(quant_gemv, "DP4A_MIN_BYTES", 0)
    real_launch = quant_gemv._launch
    monkeypatch.setattr(quant_gemv, "_launch", lambda *a: calls.append(1) or real_launch(*a))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 7)).to(torch.float16)
    out = linear(x, weight)
    assert len(calls) == 2, "both parts take the dp4a kernel"
    ref = _rounded(quantize_x(x), k) @ torch.cat(denses).T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-3, f"{err:.3g} (seed {seed})"  # f16 output
    rounded = rounding_buffers(m, weight)
    assert rounded is not None
    for buffer, value in zip(rounded, quantize_x(x), strict=True):
        buffer.copy_(value.reshape(-1))  # what the norm before the product fills in
    monkeypatch.setattr(quant_gemv, "quantize_x", None)  # a rounding launch would fail
    assert torch.equal(linear(x, weight, rounded=rounded), out)
    assert rounding_buffers(DP4A_MAX_ROWS + 1, weight) is None, "more rows take another path"
    monkeypatch.setattr(quant_gemv, "DP4A_MIN_BYTES", 1 << 40)
    calls.clear()
    linear(x, weight)
    assert not calls, "below the threshold the float kernel runs"
    assert rounding_buffers(m, weight) is None
