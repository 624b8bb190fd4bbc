"""Prefill products against Q4_K and Q6_K weights on the tensor cores, dequantizing in the tiles.

A prompt chunk (hundreds of rows of x) against a K-quant matrix is bound by compute, not by the
weight bytes: the cost to beat is a dense bf16 GEMM. Each program walks K in steps of BK elements
(within one super-block) for BN rows of W and BM rows of x: per step it loads the quants of its
rows, turns them into a [BN, BK] tile of weights in registers and makes one ``tl.dot`` of it, in
bf16 with f32 accumulation. Two arrangements (``GemmTile.w_as_b``):

- out^T tiles, ``W @ x^T``: the weights are the A operand, which Hopper's wgmma takes from
  registers (Triton still passes them through shared memory to reach the operand's layout);
- out tiles, ``x @ W^T``: the weights are the B operand, stored to shared memory once a step,
  where wgmma reads them with x's tile.

Both formats come apart into runs of 32 consecutive elements of K that need no shuffling, so x
is read in K order (16-byte cp.async copies, pipelined by Triton with the quant words):

- Q4_K: the 32 quant bytes of a 64-element chunk hold elements 0..31 in their low nibbles and
  32..63 in their high nibbles; each half is one sub-block (one scale and min per row).
- Q6_K: a 32-element quarter of a 128-element half takes one nibble of 32 ``ql`` bytes and two
  bits of 32 ``qh`` bytes; a scale covers 16 elements, so two per run.

A run's 8 words per row, shifted to its nibble, give four planes, byte k of each word
(quant_matmul's ``_assemble`` joins them: element 4u + k for word u). The weights take the same
f32 arithmetic as quant_matmul (a quant becomes ``1 + q / 2**bits`` by bit operations, then one
FMA with per-sub-block coefficients) and are rounded to bf16 for the tensor cores: the rounding
of dequantizing to a bf16 matrix first, the path this replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels.packing import PackedWeight
from metallic.kernels.quant_matmul import (
    _MAX_SCRATCH_BYTES,
    _ONE_BITS,
    _assemble,
    _check_device,
    _q4_plane,
    _q6_plane,
    interpreting,
    sm_count,
    sum_splits,
)

T = GGMLQuantizationType

GEMM_TYPES = (T.Q4_K, T.Q6_K)
# Where ops.linear multiplies a part with quant_gemm, from benchmarks/gpu_quant_gemm.py on an
# H200 (run 2, Triton 3.6): Q4_K parts of at least GEMM_MIN_WEIGHTS weights, from 64 to 768 rows
# of x. Time against today's paths (quant_matmul's fused kernel up to 128 rows for large
# matrices, else dequantize + cuBLAS), on the 8B's Q4_K parts: at 64 and 128 rows 0.69-0.90x,
# but 1.05x on q|k|v (6144 rows) at 64 and 1.06x on attn_output at 128; at 512 rows 0.74-0.91x
# on q|k|v, attn_output, gate|up and ffn_down, 1.08x on q|k (5120 rows: 80 tiles leave 52 of
# 132 SMs idle); at 2048 rows 1.5x (cuBLAS's ~790 TFLOPS outweighs the widening; the GEMM
# reaches 300-335). Smaller matrices lose (Gemma 3 270M's 640 x 2048 at 512 rows: 1.11x, k|v's
# 1024 x 4096: 1.15x). Q6_K took 1.36-1.42x at 512 rows, 1.08-1.18x the fused kernel's on
# ffn_down at 64-128 rows: not routed.
GEMM_ROWS = {T.Q4_K: (64, 768)}
GEMM_MIN_WEIGHTS = 8 << 20
_X_DTYPES = (torch.bfloat16, torch.float16)


def gemm_takes(m: int, weight: PackedWeight, dtype: torch.dtype) -> bool:
    """Whether m rows of x in `dtype` against the part `weight` take quant_gemm (see above)."""
    low, high = GEMM_ROWS.get(weight.ggml_type, (1, 0))
    large = weight.n * weight.k >= GEMM_MIN_WEIGHTS
    return low <= m <= high and large and dtype in _X_DTYPES


def uses_gemm(m: int, parts: Sequence[PackedWeight], dtype: torch.dtype) -> bool:
    """Whether m rows of x in `dtype` against the stacked parts take ops.linear's "gemm" path:
    some part takes quant_gemm at m rows (the others are widened one by one)."""
    return any(gemm_takes(m, p, dtype) for p in parts)


@dataclass(frozen=True)
class GemmTile:
    """The geometry of a launch: out^T tiles of bn rows of W by bm rows of x, K steps of bk."""

    bm: int
    bn: int
    bk: int  # elements of K per loop step (one tl.dot): 64, 128 or 256
    warps: int
    stages: int  # Triton's software pipelining depth (num_stages)
    w_as_b: bool = False  # tiles of out = x W^T, W through shared memory (else out^T = W x^T)

    def __post_init__(self) -> None:
        for name in ("bm", "bn", "warps"):
            value = getattr(self, name)
            least = 1 if name == "warps" else 16
            if value < least or value & (value - 1):
                raise MetallicError(f"GemmTile.{name} must be a power of two >= {least}: {value}")
        if self.bk not in (64, 128, 256) or self.stages < 1:
            raise MetallicError(f"GemmTile bk must be 64, 128 or 256 and stages >= 1: {self}")


# Measured best on an H200 (benchmarks/gpu_quant_gemm.py run 2, Triton 3.6), both formats: above
# 128 rows, 256 rows of x by 128 of W by K steps of 64 with W as the B operand (the least total
# time over the 8B's shapes at 512 rows: Q4_K 950 us, Q6_K 277 us; 221-244 registers, no spills,
# no C7515); up to 128 rows, 64 rows of x by 128 of W by steps of 128 (best on most shapes at 64
# and 128 rows).
_WIDE_TILE = GemmTile(bm=256, bn=128, bk=64, warps=8, stages=3, w_as_b=True)
_NARROW_TILE = GemmTile(bm=64, bn=128, bk=128, warps=8, stages=3, w_as_b=True)


def default_tile(m: int) -> GemmTile:
    """The measured tile for m rows of x (either format)."""
    return _NARROW_TILE if m <= 128 else _WIDE_TILE


# Triton code below keeps long argument lists on few lines.
# fmt: off
@triton.jit
def _mma(w, x_at, acc, W_AS_B: tl.constexpr, F32_DOT: tl.constexpr):
    """acc + w @ x^T (or, W_AS_B, acc + x @ w^T) with w rounded to x's 16-bit type.

    F32_DOT (bf16 under the interpreter, whose tl.dot multiplies bf16 tensors as their raw
    16-bit integers and whose conversion to bf16 truncates) rounds w to the nearest bf16 (ties
    to even) by its bits and multiplies the same values in f32."""
    xt = tl.load(x_at)
    if F32_DOT:
        bits = w.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        w = bits.to(tl.float32, bitcast=True)
        xt = xt.to(tl.float32)
    else:
        w = w.to(xt.dtype)
    if W_AS_B:
        acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(w, xt, acc, input_precision="ieee")
    return acc


@triton.jit
def _q4_k_coefficients(w_ptr, base, j0, r):
    """(a, b) [BN, R, 1] of sub-blocks j = j0 + r (0..7; j0 a multiple of R, r [1, R, 1]) of the
    super-blocks at words ``base`` [BN, 1, 1], for w = a*f - b with f = 1 + q/16:
    a = 16*d*sc, b = 16*d*sc + dmin*m.

    The 12 scale bytes (words 1..3) hold 6-bit scales sc and mins m: for j < 4 sc = s[j] & 63,
    m = s[j+4] & 63; for j >= 4 the low 4 bits are the nibbles of s[j+4] and the top 2 bits the
    top bits of s[j-4] (sc) and s[j] (m). j % 4 and j >= 4 are written as a scalar part and a
    constant part (which they are, j0 being a multiple of R), so no index math runs per element.
    """
    w0 = tl.load(w_ptr + base)  # d | dmin as one word: 4-byte loads are pipelined (cp.async)
    w1 = tl.load(w_ptr + base + 1)
    w2 = tl.load(w_ptr + base + 2)
    w3 = tl.load(w_ptr + base + 3)
    d = w0.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (w0 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    shift = 8 * (j0 % 4) + 8 * (r % 4)
    upper = (j0 >= 4) | (r >= 4)
    sc = tl.where(upper, ((w3 >> shift) & 15) | ((w1 >> (shift + 2)) & 0x30), (w1 >> shift) & 63)
    m = tl.where(upper, ((w3 >> (shift + 4)) & 15) | ((w2 >> (shift + 2)) & 0x30),
                 (w2 >> shift) & 63)
    a = d * sc.to(tl.float32) * 16
    return a, a + dmin * m.to(tl.float32)


@triton.jit
def _q4_k_tile(w_ptr, rows, nb, k0, one, BN: tl.constexpr, BK: tl.constexpr):
    """Weights [BN, BK] f32 of elements k0.. of every row, in K order (k0 % BK == 0, BK | 256).

    Run r (32 elements, sub-block j = j0 + r) is one nibble of the 8 words of its 64-element
    chunk: loading the words once per run and shifting by 4*(j % 2) puts element 4u + k of the
    run in byte k of word u. j0 is even, so j // 2 = j0 // 2 + r // 2 and j % 2 = r % 2."""
    r = tl.arange(0, BK // 32)[None, :, None]
    u = tl.arange(0, 8)[None, None, :]
    j0 = (k0 % 256) // 32
    base = rows * (nb * 36) + (k0 // 256) * 36
    words = tl.load(w_ptr + base + 4 + 4 * j0 + 8 * (r // 2) + u) >> (4 * (r % 2))  # [BN, R, 8]
    a, b = _q4_k_coefficients(w_ptr, base, j0, r)
    return _assemble(_q4_plane(words, 0, 0, one) * a - b, _q4_plane(words, 1, 0, one) * a - b,
                     _q4_plane(words, 2, 0, one) * a - b, _q4_plane(words, 3, 0, one) * a - b,
                     BN)


@triton.jit
def _q6_k_tile(ql_ptr, qh_ptr, sc_ptr, d_ptr, rows, nb, k0, one, BN: tl.constexpr,
               BK: tl.constexpr):
    """Weights [BN, BK] f32 of elements k0.. of every row, in K order (k0 % BK == 0, BK | 256).

    Run r (32 elements from e = e0 + 32r within the super-block; half h = e // 128, quarter
    i = e % 128 // 32) takes nibble i // 2 of ql words 16h + 8*(i % 2).. and bits 2i of qh words
    8h..: shifted, element 4u + k of the run is in byte k of word u. Scales cover 16 elements:
    words 0..3 of a run take scale e // 16, words 4..7 the next. ``sc_ptr``: the scales plane
    read as int32. e0 is a multiple of BK, so h = e0 // 128 + r // 4, i = i0 + r % 4 with
    i0 = e0 % 128 // 32 even, and e // 16 % 4 = 2 * (r % 2): scalars and constants."""
    r = tl.arange(0, BK // 32)[None, :, None]
    u = tl.arange(0, 8)[None, None, :]
    e0 = k0 % 256
    h = e0 // 128 + r // 4
    i = (e0 % 128) // 32 + r % 4
    sb = k0 // 256
    ql = tl.load(ql_ptr + rows * (nb * 32) + sb * 32 + 16 * h + 8 * (r % 2) + u)
    qh = tl.load(qh_ptr + rows * (nb * 16) + sb * 16 + 8 * h + u)
    ql = ql >> (4 * (i // 2))
    qh = qh >> (2 * i)
    d = tl.load(d_ptr + rows * nb + sb).to(tl.float32)
    # The run's two scales are bytes e // 16 % 4 and the next of word e // 64 of the plane
    # (4-byte loads are pipelined): shifted to the top, then back with the sign. The words are
    # loaded per row ([BN, 1, 1], as Q4_K's): a [BN, R, 1] load gets a layout that Triton 3.6
    # spreads to the whole tile, whose shared-memory stores then take 2 bytes each.
    sc_row = sc_ptr + rows * (nb * 4) + sb * 4 + e0 // 64
    scales = tl.load(sc_row)
    for q in tl.static_range(1, BK // 64):
        scales = tl.where(r // 2 == q, tl.load(sc_row + q), scales)
    at = 16 * (r % 2)
    s0 = d * ((scales << (24 - at)) >> 24).to(tl.float32)
    s1 = d * ((scales << (16 - at)) >> 24).to(tl.float32)
    a = tl.where(u < 4, s0 * 64, s1 * 64)
    b = tl.where(u < 4, s0 * 96, s1 * 96)
    return _assemble(_q6_plane(ql, qh, 0, 0, one) * a - b, _q6_plane(ql, qh, 1, 0, one) * a - b,
                     _q6_plane(ql, qh, 2, 0, one) * a - b, _q6_plane(ql, qh, 3, 0, one) * a - b,
                     BN)


@triton.jit
def _gemm_kernel(w0, w1, w2, w3, x_ptr, out_ptr, M, N, K, stride_xm, stride_om, one_bits,
                 split_k, FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, W_AS_B: tl.constexpr, PARTIAL: tl.constexpr,
                 F32_DOT: tl.constexpr):
    """out[m, n] for rows [BN*r, +BN) of W and [BM*t, +BM) of x, program r * m_tiles + t (t
    varies fastest: the programs that read one weight tile run together and share it in L2),
    over elements [pid1 * split_k, +split_k) of K; PARTIAL: f32 partial sums into
    out[pid1] ([splits, M, N], stride_om = N). Tiles of out^T = W x^T (W the A operand, from
    registers), or with W_AS_B tiles of out = x W^T (W the B operand, through shared memory).
    FMT 0: Q4_K (w0 the block words); 1: Q6_K (ql, qh, scales as int32, d)."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BM)
    m_first = (pid % m_tiles) * BM
    row_ids = (pid // m_tiles) * BN + tl.arange(0, BN)
    # Rows past N read row N-1 (valid memory, no masks in the loop); only stores are masked.
    rows = tl.minimum(row_ids, N - 1).to(tl.int64)[:, None, None]
    # Tiles of x: rows past M read row M-1, and their columns of out are not stored.
    m_ids = m_first + tl.arange(0, BM)
    x_row_at = x_ptr + tl.minimum(m_ids, M - 1).to(tl.int64) * stride_xm
    if W_AS_B:
        x_at = x_row_at[:, None] + tl.arange(0, BK)[None, :]  # [BM, BK]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        x_at = x_row_at[None, :] + tl.arange(0, BK)[:, None]  # x^T [BK, BM]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    one = one_bits
    nb = K // 256
    first = tl.multiple_of(tl.program_id(1) * split_k, BK)
    for k0 in range(first, tl.minimum(first + split_k, K), BK):
        if FMT == 0:
            w = _q4_k_tile(w0, rows, nb, k0, one, BN, BK)
        else:
            w = _q6_k_tile(w0, w1, w2, w3, rows, nb, k0, one, BN, BK)
        acc = _mma(w, x_at + k0, acc, W_AS_B, F32_DOT)
    if W_AS_B:
        m = m_ids[:, None]
        n = row_ids[None, :]
    else:
        m = m_ids[None, :]
        n = row_ids[:, None]
    out_at = out_ptr + m.to(tl.int64) * stride_om + n
    if PARTIAL:
        out_at += tl.program_id(1).to(tl.int64) * M * N
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=(n < N) & (m < M))
# fmt: on


def quant_gemm(
    x: torch.Tensor,
    weight: PackedWeight,
    *,
    tile: GemmTile | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for x [M, k] (bf16 or f16) and a Q4_K or Q6_K PackedWeight W [n, k]: [M, n]
    in x's dtype, accumulated in f32. ``out`` (an [M, n] tensor of x's dtype with contiguous
    rows, such as a column slice of a wider output) receives the result in place."""
    if weight.ggml_type not in GEMM_TYPES:
        raise MetallicError(f"quant_gemm reads Q4_K and Q6_K, not {weight.ggml_type.name}")
    n, k = weight.n, weight.k
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in _X_DTYPES:
        raise MetallicError(f"x must be bf16 or f16 [M, {k}], got {x.dtype} {list(x.shape)}")
    _check_device(x)
    if x.device != weight.device:
        raise MetallicError(f"x is on {x.device} but the weight is on {weight.device}")
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise MetallicError(
            f"out must be [{m}, {n}] {x.dtype} with contiguous rows, got {list(out.shape)} "
            f"{out.dtype} strides {out.stride()}"
        )
    if m == 0:
        return out
    tile = tile or default_tile(m)
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.ggml_type == T.Q4_K:
        planes = [weight.planes[0]] * 4
    else:
        ql, qh, scales, d = weight.planes
        planes = [ql, qh, scales.view(torch.int32), d]
    programs = triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn)
    split_k = tile.bk * _steps_per_split(programs, k // tile.bk, 4 * m * n, x.device)
    splits = triton.cdiv(k, split_k)
    target = out
    if splits > 1:
        target = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _gemm_kernel[(programs, splits)](
        *planes, x, target, m, n, k, x.stride(0), n if splits > 1 else out.stride(0),
        _ONE_BITS, split_k,
        FMT=0 if weight.ggml_type == T.Q4_K else 1, BM=tile.bm, BN=tile.bn, BK=tile.bk,
        W_AS_B=tile.w_as_b, PARTIAL=splits > 1,
        F32_DOT=interpreting() and x.dtype == torch.bfloat16,
        num_warps=tile.warps, num_stages=tile.stages,
    )  # fmt: skip
    if splits > 1:
        sum_splits(target, out)
    return out


def _steps_per_split(programs: int, n_steps: int, split_bytes: int, device: torch.device) -> int:
    """K steps per program: all of K, unless the tiles leave multiprocessors idle (the 8B's
    k|v at 512 rows: 32 tiles of 128 x 128 on 132 SMs); then K is split until the grid about
    fills them, as far as f32 partial sums of ``split_bytes`` a split stay within
    _MAX_SCRATCH_BYTES (they are read back by the merge right away, from the L2)."""
    splits = min(n_steps, max(1, sm_count(device) // programs))
    splits = max(1, min(splits, _MAX_SCRATCH_BYTES // split_bytes))
    return triton.cdiv(n_steps, splits)
