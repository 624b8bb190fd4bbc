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

import metallic.kernels as kernels
from metallic.errors import MetallicError
from metallic.kernels import prepare_weight
from metallic.kernels.quant_gemm import (
    GEMM_ROWS,
    GemmPlan,
    GemmTile,
    default_tile,
    gemm_joins,
    gemm_plan,
    gemm_takes,
    quant_gemm,
    quant_gemm_parts,
    uses_gemm,
)
from metallic.ops.linear import LinearWeight, linear, native_path
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


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def _counts_are_zero() -> bool:
    """The per-tile piece counts are back to 0, ready for the next launch."""
    return all(not c.any() for c in quant_gemm_module._COUNTS.values())


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_a_grid_of_few_tiles_splits_k(qtype: GGMLQuantizationType) -> None:
    """One tile of out (fewer programs than the interpreter's two multiprocessors): K is split
    in two, the f32 pieces added by the piece that finishes last; the same product."""
    seed = _seed()
    n, k, m = 24, 512, 12
    weight, dense = _weight(qtype, n, k, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    tile = GemmTile(bm=16, bn=32, bk=64, warps=4, stages=2)
    assert quant_gemm_module._schedule(GemmPlan(tile), 1, k // 64, 4 * m * n, 2) == (0, 2)
    out = quant_gemm(x, weight, tile=tile)
    err = _relative_error(out, x.double() @ dense.double().T)
    assert err < 2e-3, f"error {err:.3g} (seed {seed})"
    assert _counts_are_zero()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_shared_tiles_make_the_same_product(
    qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stream-K and uneven splits of K (programs whose steps cross from one tile into the next,
    tiles in up to four pieces) on a pretended 5-multiprocessor device: the product within
    f32 rounding of one program per tile, the same bits on a second launch (the pieces are added
    in program order, and the counts are back to 0)."""
    seed = _seed()
    n, k, m = 40, 768, 20  # 2 x 2 tiles of 16 x 32, 6 steps of 128 each
    weight, dense = _weight(qtype, n, k, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    whole = quant_gemm(x, weight, plan=GemmPlan(SMALL, splits=1))
    monkeypatch.setattr(quant_gemm_module, "sm_count", lambda device: 5)
    for plan, schedule in (
        (GemmPlan(SMALL, stream=True), (0, 5)),  # 24 steps in 5 programs
        (GemmPlan(dataclasses.replace(SMALL, registers=128), stream=True, per_sm=2), (0, 10)),
        (GemmPlan(SMALL, splits=4), (0, 16)),  # 1.5 steps a program
        (GemmPlan(SMALL, splits=3), (0, 12)),
    ):
        assert quant_gemm_module._schedule(plan, 4, 6, 4 * m * n, 5) == schedule
        got = quant_gemm(x, weight, plan=plan)
        assert _relative_error(got, whole.double()) < 2e-3, (plan, seed)
        assert torch.equal(got, quant_gemm(x, weight, plan=plan)) and _counts_are_zero()
    ref = x.double() @ dense.double().T
    assert _relative_error(whole, ref) < 2e-3, seed


def test_stream_k_keeps_whole_waves_of_single_tiles() -> None:
    """With 10 tiles on 3 multiprocessors the first 2 waves (6 tiles) run one a program, the
    last 4 tiles' steps are spread over 3; a whole number of waves is not shared at all."""
    plan = GemmPlan(SMALL, stream=True)
    assert quant_gemm_module._schedule(plan, 10, 8, 1, 3) == (6, 3)
    assert quant_gemm_module._schedule(plan, 9, 8, 1, 3) == (9, 0)
    assert quant_gemm_module._schedule(plan, 2, 8, 1, 3) == (0, 3)
    assert quant_gemm_module._schedule(plan, 1, 2, 1, 3) == (0, 2)  # no more programs than steps


@pytest.mark.parametrize("formats", [(T.Q4_K, T.Q6_K), (T.Q6_K, T.Q4_K)], ids=str)
@pytest.mark.parametrize("stream", [False, True])
def test_two_parts_in_one_launch(
    formats: tuple[GGMLQuantizationType, GGMLQuantizationType],
    stream: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two stacked parts of different formats (the 8B's q|k in Q4_K and v in Q6_K) in one
    launch, into a column slice of a wider output: each part's columns are the bits of its own
    launch (the same tiles, the same arithmetic), or with stream-K within f32 rounding of them."""
    seed = _seed()
    monkeypatch.setattr(quant_gemm_module, "sm_count", lambda device: 5)
    (a, dense_a), (b, dense_b) = (_weight(t, n, 512, seed + i) for i, (t, n) in
                                  enumerate(zip(formats, (40, 24), strict=True)))  # fmt: skip
    m = 20
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    alone = torch.cat([quant_gemm(x, p, plan=GemmPlan(SMALL, splits=1)) for p in (a, b)], 1)
    wide = torch.zeros(m, 70, dtype=torch.float16)
    plan = GemmPlan(SMALL, splits=1, stream=stream)
    got = quant_gemm_parts(x, (a, b), plan=plan, out=wide[:, 3:67])
    assert got.data_ptr() == wide[:, 3:].data_ptr()
    assert not wide[:, :3].any() and not wide[:, 67:].any()
    if stream:
        assert _relative_error(got, alone.double()) < 2e-3, seed
    else:
        assert torch.equal(got, alone), seed
    ref = x.double() @ torch.cat([dense_a, dense_b]).double().T
    assert _relative_error(got, ref) < 2e-3, seed
    assert _counts_are_zero()


def test_plans_come_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemm_plan reads GEMM_PLANS at the measured row count nearest m, else the default tile."""
    q4, q6 = (_weight(t, 8, 256, _seed())[0] for t in (T.Q4_K, T.Q6_K))
    plan = GemmPlan(SMALL, stream=True)
    monkeypatch.setitem(quant_gemm_module.GEMM_PLANS, (512, 16, 256, "Q4_K+Q6_K"), plan)
    assert gemm_plan(600, (q4, q6)) == plan and gemm_plan(400, (q4, q6)) == plan
    assert gemm_plan(300, (q4, q6)) == GemmPlan(default_tile(300))
    assert gemm_plan(512, (q6, q4)) == GemmPlan(default_tile(512))


def test_two_formats_join_where_a_plan_was_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.linear multiplies Q4_K | Q6_K parts (q|k and v) in one quant_gemm_parts launch, with
    the plan of GEMM_PLANS, where the table holds one for them; else as before (v widened)."""
    seed = _seed()
    k, m = 512, 160
    parts = [_weight(t, n, k, seed + i) for i, (t, n) in enumerate(((T.Q4_K, 40), (T.Q6_K, 24)))]
    native = tuple(p for p, _ in parts)
    weight = LinearWeight((T.Q4_K, T.Q6_K), (40, 24), k, native=native)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    assert not gemm_joins(m, native, x.dtype) and native_path(m, native, x.dtype) == "dequantize"
    plan = GemmPlan(GemmTile(bm=64, bn=32, bk=128, warps=4, stages=2), stream=True)
    monkeypatch.setitem(quant_gemm_module.GEMM_PLANS, (256, 64, k, "Q4_K+Q6_K"), plan)
    assert gemm_joins(m, native, x.dtype) and native_path(m, native, x.dtype) == "gemm"
    assert not gemm_joins(128, native, x.dtype) and not gemm_joins(m, native, torch.float32)
    assert not gemm_joins(m, native[::-1], x.dtype)  # another key
    launches: list[GemmPlan | None] = []
    real = quant_gemm_module.quant_gemm_parts
    monkeypatch.setattr(
        quant_gemm_module,
        "quant_gemm_parts",
        lambda x, p, **kw: launches.append(kw.get("plan")) or real(x, p, **kw),
    )
    monkeypatch.setattr(kernels, "dequantize_gpu", None)  # nothing is widened
    got = linear(x, weight)
    assert launches == [None]  # one launch, its plan from the table
    assert torch.equal(got, real(x, native, plan=plan))
    ref = x.double() @ torch.cat([dense for _, dense in parts]).double().T
    assert _relative_error(got, ref) < 2e-3, seed


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
    with pytest.raises(MetallicError, match="registers"):
        GemmTile(bm=16, bn=16, bk=64, warps=4, stages=2, registers=300)
    with pytest.raises(MetallicError, match="splits"):
        GemmPlan(SMALL, splits=-1)
    with pytest.raises(MetallicError, match="one or two"):
        quant_gemm_parts(x, (weight,) * 3)
    with pytest.raises(MetallicError, match="share k"):
        quant_gemm_parts(x, (weight, _weight(T.Q4_K, 16, 512, _seed())[0]))


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
