"""ops.linear's native products: which kernel path runs for which number of rows, and that each
path gives x @ W.T for stacked parts of different formats (in the interpreter)."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

import metallic.kernels as kernels
from metallic.kernels import MAX_FUSED_M, prepare_weight, quant_gemv
from metallic.ops.linear import LinearWeight, linear, native_path
from metallic.quant.quantize import quantize
from metallic.quant.reference import dequantize

T = GGMLQuantizationType


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# The module (the package exports its function of the same name).
quant_matmul_module = importlib.import_module("metallic.kernels.quant_matmul")
quant_gemm_module = importlib.import_module("metallic.kernels.quant_gemm")


def _part(qtype: GGMLQuantizationType, n: int, k: int, seed: int):
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
    return prepare_weight(raw, qtype, n, k), dequantize(raw, qtype, n * k).view(n, k).double()


def test_native_path_by_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to DP4A_MAX_ROWS rows against formats the dp4a kernels read (large ones at one row):
    dp4a; otherwise the fused kernel up to 16 rows, and up to MAX_FUSED_M rows against large
    matrices (batched decode); the tensor-core GEMM where some large part's format takes it
    (quant_gemm.GEMM_ROWS, first among the multi-row paths); else dequantize + one dense
    product (also for small matrices from 17 rows)."""
    blocks = tuple(_part(t, 8, 256, _seed())[0] for t in (T.Q8_0, T.Q5_0, T.Q4_0))
    for m in range(1, quant_gemv.DP4A_MAX_ROWS + 1):
        assert native_path(m, blocks) == "fused", m  # small matrices: the float kernel
    monkeypatch.setattr(quant_gemv, "DP4A_MIN_BYTES", 0)
    for m in range(1, quant_gemv.DP4A_MAX_ROWS + 1):
        assert native_path(m, blocks) == "dp4a", m
    k_quants = tuple(_part(t, 8, 256, _seed())[0] for t in (T.Q4_K, T.Q6_K))
    mixed = (*k_quants, _part(T.Q5_K, 8, 256, _seed())[0])  # Q5_K: no dp4a kernel
    for m in range(1, quant_gemv.DP4A_MAX_ROWS + 1):
        assert native_path(m, k_quants) == native_path(m, (*k_quants, *blocks)) == "dp4a", m
        assert native_path(m, mixed) == "fused", m
    for m in (quant_gemv.DP4A_MAX_ROWS + 1, 16):
        assert native_path(m, k_quants) == native_path(m, mixed) == "fused", m
    for m in (17, 64, MAX_FUSED_M):
        assert native_path(m, mixed) == "dequantize", m  # a small matrix
    monkeypatch.setattr(quant_matmul_module, "FUSED_MIN_BYTES", 0)  # every matrix large
    for m in (17, 32, 33, 64, MAX_FUSED_M):
        assert native_path(m, k_quants) == native_path(m, mixed) == "fused", m
    assert native_path(64, mixed, torch.float32) == "dequantize"  # f32 rows: up to 16
    assert native_path(16, mixed, torch.float32) == "fused"
    assert native_path(32, k_quants, torch.float32) == "dp4a"  # f32 rows dp4a reads: up to 32
    assert native_path(MAX_FUSED_M + 1, k_quants) == "dequantize"  # small matrices
    monkeypatch.setattr(quant_gemm_module, "GEMM_MIN_WEIGHTS", 0)  # every matrix large
    assert native_path(MAX_FUSED_M + 1, k_quants) == "gemm"  # prompt chunks, Q4_K among them
    assert native_path(4 * MAX_FUSED_M, k_quants, torch.float32) == "dequantize"
    assert native_path(4 * MAX_FUSED_M, k_quants[1:]) == "dequantize"  # Q6_K alone
    assert native_path(16 * MAX_FUSED_M, k_quants) == "dequantize"  # beyond GEMM_ROWS
    low = quant_gemm_module.GEMM_ROWS[T.Q4_K][0]
    assert native_path(low, k_quants) == "gemm"  # before the fused kernel where it takes them
    assert native_path(low - 1, k_quants) == "fused"
    assert native_path(4 * MAX_FUSED_M, mixed) == "gemm"  # Q4_K's part; the others widened
    assert native_path(4 * MAX_FUSED_M, mixed[2:]) == "dequantize"
    monkeypatch.setattr(quant_gemv, "DP4A_MIN_BYTES", 1 << 40)
    assert native_path(1, k_quants) == native_path(8, k_quants) == "fused"


def _stacked_product(m: int, seed: int) -> tuple[LinearWeight, torch.Tensor, torch.Tensor]:
    """Stacked Q4_K | Q6_K | Q8_0 parts of 40, 24 and 16 rows (q|k|v-like) over K = 512, m
    rows of f16 x, and x @ W.T in f64."""
    k, types, rows = 512, (T.Q4_K, T.Q6_K, T.Q8_0), (40, 24, 16)
    parts = [_part(t, n, k, seed + i) for i, (t, n) in enumerate(zip(types, rows, strict=True))]
    weight = LinearWeight(types, rows, k, native=tuple(p for p, _ in parts))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    return weight, x, x.double() @ torch.cat([dense for _, dense in parts]).T


@pytest.mark.parametrize("m", [33, 100])
def test_linear_runs_the_path_it_names(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacked Q4_K | Q6_K | Q8_0 parts (q|k|v-like, each writing its own output columns): M rows
    take the fused kernel, one call a part and no dequantization; with MAX_FUSED_M below M, one
    scratch matrix of all parts and no fused call. Both give x @ W.T (f16 activations)."""
    seed = _seed()
    weight, x, ref = _stacked_product(m, seed)
    calls: list[str] = []
    for name in ("quant_matmul", "dequantize_gpu"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels,
            name,
            lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw),
        )
    monkeypatch.setattr(quant_matmul_module, "FUSED_MIN_BYTES", 0)  # as large matrices go
    for max_fused, expected in (
        (MAX_FUSED_M, ["quant_matmul"] * 3),
        (m - 1, ["dequantize_gpu"] * 3),
    ):
        monkeypatch.setattr(quant_matmul_module, "MAX_FUSED_M", max_fused)
        calls.clear()
        out = linear(x, weight)
        assert calls == expected, f"MAX_FUSED_M={max_fused}"
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-3, f"MAX_FUSED_M={max_fused} M={m}: error {err:.3g} (seed {seed})"


def test_a_widen_limit_widens_slices_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a device budget the dequantize path widens at most `widen_limit` bytes at a time:
    slices of each part's rows, every output column computed once, the same x @ W.T. Products
    that widen less than the limit, or not at all, run as before."""
    seed = _seed()
    weight, x, ref = _stacked_product(40, seed)  # 40 rows, small matrices: the dequantize path
    k = weight.in_features
    widened: list[int] = []
    real = kernels.dequantize_gpu

    def counting(*args, out, **kwargs):
        widened.append(out.shape[0])
        return real(*args, out=out, **kwargs)

    monkeypatch.setattr(kernels, "dequantize_gpu", counting)
    limit = 16 * k * x.element_size()  # 16 rows of the scratch
    out = linear(x, weight, widen_limit=limit)
    assert widened == [16, 16, 8, 16, 8, 16]  # 40 = 16+16+8, 24 = 16+8, 16
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-3, f"error {err:.3g} (seed {seed})"
    widened.clear()
    assert torch.equal(linear(x, weight, widen_limit=80 * k * 2), linear(x, weight))
    assert widened == [40, 24, 16] * 2  # within the limit: one scratch, as without it


@pytest.mark.parametrize("gemm_formats", [(T.Q4_K,), (T.Q4_K, T.Q6_K)])
def test_prompt_chunks_of_k_quants_take_the_gemm(
    gemm_formats: tuple[GGMLQuantizationType, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacked Q4_K | Q6_K parts (the formats of a Q4_K_M model) at prompt-chunk rows: one
    quant_gemm call a part whose format takes it (GEMM_ROWS), each writing its own output
    columns; the other part widened alone and multiplied (under a widen_limit, a slice of rows
    at a time); together x @ W.T."""
    seed = _seed()
    k, m = 512, 24
    parts = [_part(t, n, k, seed + i) for i, (t, n) in enumerate(((T.Q4_K, 40), (T.Q6_K, 24)))]
    weight = LinearWeight((T.Q4_K, T.Q6_K), (40, 24), k, native=tuple(p for p, _ in parts))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    ref = x.double() @ torch.cat([dense for _, dense in parts]).T
    calls: list[str] = []
    for module, name in ((quant_gemm_module, "quant_gemm"), (kernels, "dequantize_gpu")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw),
        )
    # small shapes for the interpreter: these formats take the GEMM from m rows
    monkeypatch.setattr(quant_gemm_module, "GEMM_ROWS", dict.fromkeys(gemm_formats, (m, m)))
    monkeypatch.setattr(quant_gemm_module, "GEMM_MIN_WEIGHTS", 0)
    expected = ["quant_gemm" if t in gemm_formats else "dequantize_gpu" for t in weight.ggml_types]
    out = linear(x, weight)
    assert calls == expected
    calls.clear()
    sliced = linear(x, weight, widen_limit=16 * k * x.element_size())  # 16 rows at a time
    assert calls == expected + ["dequantize_gpu"] * (len(gemm_formats) == 1)  # Q6_K: 16 + 8
    for got in (out, sliced):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"error {err:.3g} (seed {seed})"


def test_decode_rows_take_dp4a_each_row_as_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step of 2..8 sequences: stacked Q4_K | Q6_K parts take the dp4a kernels, x's
    rows rounded in one launch or by the norm before (rounding_buffers); each row's result is
    the same bits among 8 rows, 3 or alone, and x @ W.T with x as rounded."""
    from metallic.kernels.norm import rms_norm
    from metallic.ops.linear import rounding_buffers

    monkeypatch.setattr(quant_gemv, "DP4A_MIN_BYTES", 0)
    seed = _seed()
    k, rows = 256, quant_gemv.DP4A_MAX_ROWS
    parts = [_part(t, n, k, seed + i) for i, (t, n) in enumerate(((T.Q4_K, 16), (T.Q6_K, 8)))]
    weight = LinearWeight((T.Q4_K, T.Q6_K), (16, 8), k, native=tuple(p for p, _ in parts))
    dense = torch.cat([d for _, d in parts])
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    assert all(native_path(m, weight.native or ()) == "dp4a" for m in range(1, rows + 1))
    out = linear(x, weight)
    xq, dx, _ = quant_gemv.quantize_x(x)
    exact = (xq.view(-1, 32).double() * dx.view(-1, 1).double()).view(rows, k) @ dense.T
    err = ((out.double() - exact).norm() / exact.norm()).item()
    assert err < 1e-5, f"error {err:.3g} (seed {seed})"  # f32 rows
    assert torch.equal(linear(x[:3], weight), out[:3]), f"seed {seed}"
    assert torch.equal(linear(x[-1:], weight), out[-1:]), f"seed {seed}"
    rounded = rounding_buffers(3, weight)
    assert rounded is not None
    normed = rms_norm(x[:3], torch.ones(k), 1e-6, rounded=rounded)
    assert torch.equal(linear(normed, weight, rounded=rounded), linear(normed, weight))


def test_f32_rows_past_one_pass_take_dp4a_eight_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """f32 rows (an output head's x) take the dp4a kernels up to DP4A_F32_MAX_ROWS, DP4A_MAX_ROWS
    rows a pass: 19 rows in passes of 8, 8 and 3, each row the bits it has alone, all near the
    f64 product; 16-bit rows past DP4A_MAX_ROWS keep the float kernels."""
    monkeypatch.setattr(quant_gemv, "DP4A_MIN_BYTES", 0)
    seed = _seed()
    weight, x16, ref = _stacked_product(19, seed)
    parts = weight.native
    x = x16.float()
    assert native_path(19, parts, torch.float32) == "dp4a"
    assert native_path(quant_gemv.DP4A_F32_MAX_ROWS + 1, parts, torch.float32) != "dp4a"
    assert native_path(quant_gemv.DP4A_MAX_ROWS + 1, parts, torch.float16) != "dp4a"
    out = linear(x, weight)
    alone = torch.cat([linear(x[i : i + 1], weight) for i in range(x.shape[0])])
    assert torch.equal(out, alone)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"error {err:.3g} (seed {seed})"  # x rounded to int8 per 32
