"""Quantized matmul and GPU dequantization kernels against the reference, in the interpreter.

Weights are random floats quantized with metallic.quant.quantize; the oracle is
metallic.quant.reference.dequantize, and the product ``x.double() @ W.double().T``. Seeds are fresh
each run and appear in failure messages. Shapes are small but cover every kernel path: M = 1
(FMA), M >= 2 (DOT) in every M bucket of its tile table and in several tiles of M, K ending
inside a step, split K, N not a multiple of the row block. bf16 activations only run the M = 1
path here: the interpreter's tl.dot on bf16 is wrong, and it rounds f32 -> bf16 by truncation
(bf16 is checked on the GPU by benchmarks/gpu_quant_matmul.py and gpu_batched_matmul.py).
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError, UnsupportedTensorType
from metallic.kernels import DotTile, dequantize_gpu, dot_tile, prepare_weight, quant_matmul
from metallic.quant.formats import block_format
from metallic.quant.quantize import quantize
from metallic.quant.reference import dequantize

# The module (the package exports its function under the same name): tests patch its constants.
quant_matmul_module = importlib.import_module("metallic.kernels.quant_matmul")

T = GGMLQuantizationType
FORMATS = (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16)
# ||out - ref|| / ||ref||: f32 math throughout, so the activation dtype's rounding dominates. The
# reference takes x as rounded, so in f16 what remains is the DOT mode's rounding of each weight
# to f16 for tl.dot and the output's rounding: unit roundoff 2**-11 each, RMS 2**-11 / sqrt(3)
# ~ 3e-4 relative, about 4e-4 together; bf16 the same with 2**-8 (~3e-3).
BOUND = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _weights(qtype: GGMLQuantizationType, n: int, k: int, seed: int) -> torch.Tensor:
    """Raw GGUF bytes of a random [n, k] matrix (values of a trained layer's size)."""
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    if qtype == T.BF16:
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.uint8).reshape(-1)
    return torch.from_numpy(quantize(values, qtype).reshape(-1).copy())


def _reference(raw: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int) -> torch.Tensor:
    return dequantize(raw, qtype, n * k).view(n, k)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "an output element was never written"
    return ((out.double() - ref).norm() / ref.norm()).item()


def _check(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    m: int,
    dtype: torch.dtype,
    steps_per_split: int | None = None,
) -> None:
    seed = _seed()
    raw = _weights(qtype, n, k, seed)
    weight = _reference(raw, qtype, n, k).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = quant_matmul(x, prepare_weight(raw, qtype, n, k), qtype, n, k,
                       steps_per_split=steps_per_split)  # fmt: skip
    assert out.shape == (m, n) and out.dtype == dtype
    err = _relative_error(out, x.double() @ weight.T)
    assert err < BOUND[dtype], f"{qtype.name} M={m} {dtype} seed={seed}: error {err:.3g}"


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_f16(qtype: GGMLQuantizationType, m: int) -> None:
    _check(qtype, 72, 512, m, torch.float16)


@pytest.mark.parametrize("m", [17, 32, 33, 64, 100, 512])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_many_rows(qtype: GGMLQuantizationType, m: int) -> None:
    """Batched decode (17..64: one tile of M, padded) and prefill sizes (tiles of 128 rows)."""
    _check(qtype, 40, 512, m, torch.float16)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_tiles_of_m_with_split_k_and_a_partial_step(qtype: GGMLQuantizationType) -> None:
    """Two tiles of M (the second partial), each K step its own program, K ending inside a step
    (where the format's step is longer than its block): every tile's partial sums land in its
    own rows of the scratch."""
    k = 768 if block_format(qtype).block_size == 256 else 352
    _check(qtype, 20, k, 160, torch.float16, steps_per_split=1)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_f32(qtype: GGMLQuantizationType, m: int) -> None:
    _check(qtype, 40, 256, m, torch.float32)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_bf16_single_row(qtype: GGMLQuantizationType) -> None:
    _check(qtype, 40, 512, 1, torch.bfloat16)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_k_ending_inside_a_step(qtype: GGMLQuantizationType, m: int) -> None:
    """Long rows (a step spans up to 8 super-blocks) with a partial last step."""
    k = 2816 if block_format(qtype).block_size == 256 else 1312
    _check(qtype, 20, k, m, torch.float16)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_matmul_split_k(qtype: GGMLQuantizationType, m: int) -> None:
    """One step per program: every program writes partial sums that a second kernel adds."""
    _check(qtype, 24, 1024, m, torch.float32, steps_per_split=1)


@pytest.mark.parametrize("groups", [0, 32], ids=["one-superblock", "wide-steps"])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(
    qtype: GGMLQuantizationType, groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either step width (several super-blocks a step may end inside K: 768 = 1.5 x 512)."""
    monkeypatch.setattr(quant_matmul_module, "_DEQUANT_GROUPS", groups)
    k = 768 if block_format(qtype).block_size == 256 else 352
    seed = _seed()
    raw = _weights(qtype, 37, k, seed)
    expected = _reference(raw, qtype, 37, k)
    got = dequantize_gpu(prepare_weight(raw, qtype, 37, k), qtype, 37, k)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), f"{qtype.name} seed={seed}"
    half = dequantize_gpu(raw, qtype, 37, k, torch.float16)
    assert torch.equal(half, expected.to(torch.float16)), f"{qtype.name} seed={seed}"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_packed_weight_keeps_the_bits_per_weight(qtype: GGMLQuantizationType) -> None:
    raw = _weights(qtype, 8, 512, _seed())
    packed = prepare_weight(raw, qtype, 8, 512)
    assert packed.nbytes == raw.numel()
    if qtype in (T.Q4_K, T.Q5_K, T.F16, T.BF16):  # aligned blocks are used in place
        assert packed.planes[0].data_ptr() == raw.data_ptr()


def test_bad_input_is_a_metallic_error(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _weights(T.Q4_K, 8, 256, _seed())
    x = torch.randn(1, 256)
    with pytest.raises(UnsupportedTensorType):
        quant_matmul(x, raw, T.Q2_K, 8, 256)
    with pytest.raises(MetallicError, match="x must be"):
        quant_matmul(torch.randn(1, 512), raw, T.Q4_K, 8, 256)
    with pytest.raises(MetallicError, match="f32, f16 or bf16"):
        quant_matmul(x.to(torch.int32), raw, T.Q4_K, 8, 256)
    with pytest.raises(MetallicError, match="bytes"):
        quant_matmul(x, raw[:-1], T.Q4_K, 8, 256)
    with pytest.raises(MetallicError, match="whole 256-element blocks"):
        prepare_weight(raw, T.Q4_K, 16, 128)
    packed = prepare_weight(raw, T.Q4_K, 8, 256)
    with pytest.raises(MetallicError, match="packed weight"):
        quant_matmul(torch.randn(1, 512), packed, T.Q4_K, 4, 512)
    with pytest.raises(MetallicError, match="steps_per_split"):
        quant_matmul(x, packed, T.Q4_K, 8, 256, steps_per_split=0)
    with pytest.raises(MetallicError, match="power of two >= 16"):
        quant_matmul(x.repeat(4, 1), packed, T.Q4_K, 8, 256, tile=DotTile(24, 64, 8, 4, 1, 4))
    with pytest.raises(MetallicError, match="stages"):
        DotTile(16, 64, 8, 4, 0, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MetallicError, match="run on CUDA"):
        quant_matmul(x, packed, T.Q4_K, 8, 256)


def test_tiles_by_rows_and_split_k_by_scratch() -> None:
    """Each bucket of M takes its table tile (prefill sizes tiles of 128 rows); K is split toward
    the bucket's programs per SM (the interpreter counts 2 SMs) but never into more f32 partial
    sums than the L2 keeps."""
    for m, bm in ((2, 16), (16, 16), (17, 32), (33, 64), (64, 64), (65, 128), (4096, 128)):
        assert dot_tile(m, T.Q4_K).bm == bm, m
    assert dot_tile(64, T.Q6_K).bn == 64 and dot_tile(64, T.Q4_K).bn == 128
    cpu = torch.device("cpu")
    split = quant_matmul_module._steps_per_split
    limit = quant_matmul_module._MAX_SCRATCH_BYTES
    # 1 program, 16 steps, 4 programs a SM on 2 SMs: 8 splits of 2 steps while partial sums
    # are small, 2 splits when only two fit the limit, none when one split alone passes it.
    assert split(1, 16, 1 << 20, 1 << 10, 4, cpu) == 2
    assert split(1, 16, 1 << 20, limit // 2, 4, cpu) == 8
    assert split(1, 16, 1 << 20, limit + 1, 4, cpu) == 16
