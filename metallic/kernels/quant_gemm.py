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

A launch covers one or two stacked parts, of either format (q|k in Q4_K with v in Q6_K make
one grid). Tiles are few at prompt sizes (the 8B's q|k|v at 512 rows: 96 of 256 x 128 on 132
SMs), so a GemmPlan may share the tiles' K steps among programs: K split in pieces per tile, or
stream-K (the last waves' steps spread evenly over one program per SM), the pieces' f32 sums
added in the kernel by the piece that finishes last (no merge launch).

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
    _move,
    _q4_plane,
    _unit,
    interpreting,
    sm_count,
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
    some part takes quant_gemm at m rows (the others are widened one by one), or all of them
    take it together (`gemm_joins`)."""
    return any(gemm_takes(m, p, dtype) for p in parts) or gemm_joins(m, parts, dtype)


# Rows of x where stacked parts of two formats may share one launch (the range --layer-8b
# measures, 256 to 1024, and a little beyond).
JOINED_ROWS = (129, 2048)


def gemm_joins(m: int, parts: Sequence[PackedWeight], dtype: torch.dtype) -> bool:
    """Whether m rows of x in `dtype` against two stacked parts (the 8B's q|k in Q4_K and v in
    Q6_K) take one quant_gemm_parts launch for both: where GEMM_PLANS holds a plan measured
    for them (at the nearest row count), which is then entered only where it beat ops.linear's
    path of the time (q|k by quant_gemm, v widened for cuBLAS)."""
    if len(parts) != 2 or dtype not in _X_DTYPES or not JOINED_ROWS[0] <= m <= JOINED_ROWS[1]:
        return False
    return all(p.ggml_type in GEMM_TYPES for p in parts) and _key(m, parts) in GEMM_PLANS


@dataclass(frozen=True)
class GemmTile:
    """The geometry of a launch: out^T tiles of bn rows of W by bm rows of x, K steps of bk."""

    bm: int
    bn: int
    bk: int  # elements of K per loop step (one tl.dot): 64, 128 or 256
    warps: int
    stages: int  # Triton's software pipelining depth (num_stages)
    w_as_b: bool = False  # tiles of out = x W^T, W through shared memory (else out^T = W x^T)
    # Registers a thread may take (ptxas's maxnreg; 0: its choice, which fills the SM with one
    # CTA of 8 warps): 128 fits two CTAs of 8 warps, one dequantizing while the other multiplies.
    registers: int = 0

    def __post_init__(self) -> None:
        for name in ("bm", "bn", "warps"):
            value = getattr(self, name)
            least = 1 if name == "warps" else 16
            if value < least or value & (value - 1):
                raise MetallicError(f"GemmTile.{name} must be a power of two >= {least}: {value}")
        if self.bk not in (64, 128, 256) or self.stages < 1:
            raise MetallicError(f"GemmTile bk must be 64, 128 or 256 and stages >= 1: {self}")
        if self.registers and not 24 <= self.registers <= 255:
            raise MetallicError(f"GemmTile registers must be 0 or 24..255: {self}")


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


@dataclass(frozen=True)
class GemmPlan:
    """A tile and how the programs share the tiles' K steps (see _gemm_kernel):

    - ``stream``: whole waves of single tiles but the last, then the rest of the work spread
      evenly over ``per_sm`` programs per multiprocessor (stream-K), pieces of a tile added by
      its last piece;
    - else each tile in ``splits`` pieces of K (0: 1, or as many as about fill the
      multiprocessors where the tiles leave them idle)."""

    tile: GemmTile
    splits: int = 0
    stream: bool = False
    per_sm: int = 1  # stream-K programs per multiprocessor (2 where two CTAs fit one)

    def __post_init__(self) -> None:
        if self.splits < 0 or self.per_sm < 1:
            raise MetallicError(f"GemmPlan splits must be >= 0 and per_sm >= 1: {self}")


def _key(m: int, parts: Sequence[PackedWeight]) -> tuple[int, int, int, str]:
    """GEMM_PLANS' key: the measured row count nearest m (256, 512 or 1024), n, k, formats."""
    rows = 256 if m <= 384 else 512 if m <= 768 else 1024
    formats = "+".join(p.ggml_type.name for p in parts)
    return rows, sum(p.n for p in parts), parts[0].k, formats


# Plans per (rows of x, n, k, formats) from `benchmarks/gpu_quant_gemm.py --layer-8b` on an
# H200: the fastest candidate of each product of a Llama-3-8B layer. Other products take the
# default tile with K split where the tiles leave SMs idle. A plan for two formats ("Q4_K+Q6_K")
# also routes those parts to one launch (`gemm_joins`); single parts are routed by GEMM_ROWS.
GEMM_PLANS: dict[tuple[int, int, int, str], GemmPlan] = {}


def gemm_plan(m: int, parts: Sequence[PackedWeight]) -> GemmPlan:
    """The plan for m rows of x against the stacked parts (see GEMM_PLANS)."""
    return GEMM_PLANS.get(_key(m, parts)) or GemmPlan(default_tile(m))


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
    # The run's 6-bit quants, one a byte (bits 6 and 7 left over, masked per element): the
    # nibble of ql below qh's two bits, joined once a word rather than once an element.
    q6 = _bit_select(ql >> (4 * (i // 2)), (qh >> (2 * i)) << 4, 0x0F0F0F0F)
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
    return _assemble(_q6_byte(q6, 0, one) * a - b, _q6_byte(q6, 1, one) * a - b,
                     _q6_byte(q6, 2, one) * a - b, _q6_byte(q6, 3, one) * a - b, BN)


@triton.jit
def _bit_select(low, high, mask):
    """The bits of ``low`` where ``mask`` is set, else those of ``high`` (one LOP3)."""
    return (low & mask) | (high & ~mask)


@triton.jit
def _q6_byte(q6, k: tl.constexpr, one):
    """Value f = 1 + q/64 of byte k's 6-bit quant q (bits 6 and 7 of the byte ignored)."""
    return _unit(_move(q6, 8 * k, 17) & 0x7E0000, one)


@triton.jit
def _tile_sum(p0, p1, p2, p3, rows, nb, k_first, k_end, x_at, one, FMT: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, W_AS_B: tl.constexpr,
              F32_DOT: tl.constexpr):
    """The f32 tile of elements [k_first, k_end) of K (multiples of BK) for the rows ``rows``
    of a part of format FMT (0: Q4_K, p0 the block words; 1: Q6_K, p0..p3 ql, qh, scales as
    int32, d) and x's rows at ``x_at``: out^T [BN, BM], or with W_AS_B out [BM, BN]."""
    acc = tl.zeros((BM, BN) if W_AS_B else (BN, BM), dtype=tl.float32)
    for k0 in range(tl.multiple_of(k_first, BK), k_end, BK):
        if FMT == 0:
            w = _q4_k_tile(p0, rows, nb, k0, one, BN, BK)
        else:
            w = _q6_k_tile(p0, p1, p2, p3, rows, nb, k0, one, BN, BK)
        acc = _mma(w, x_at + k0, acc, W_AS_B, F32_DOT)
    return acc


@triton.jit
def _add_piece(acc, ws_ptr, counts_ptr, out_at, mask, t, t_start, steps, first_tile, q, base,
               span, sk_programs, slot_at, tile_size):
    """Store program q's piece ``acc`` of tile t in its slot and count it; the last piece of
    the tile adds all pieces in program order (the same sum whoever arrives last), stores the
    tile and sets its count back to 0."""
    slot = (2 * q + (t != first_tile).to(tl.int32)).to(tl.int64) * tile_size
    tl.store(ws_ptr + slot + slot_at, acc)
    tl.debug_barrier()  # every thread's piece is stored before the count says so
    piece = tl.atomic_add(counts_ptr + t, 1, sem="acq_rel")
    q_first = ((t_start - base + 1).to(tl.int64) * sk_programs - 1) // span
    q_last = ((t_start + steps - base).to(tl.int64) * sk_programs - 1) // span
    if piece == q_last - q_first:
        # Every piece from the workspace (acc no longer held: a second f32 tile in registers
        # would spill); .cg reads them from the L2, where the other SMs' stores are.
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for r in range(q_first, q_last + 1):
            r_first = (base + r * span // sk_programs) // steps
            r_slot = (2 * r + (t != r_first).to(tl.int64)) * tile_size
            total += tl.load(ws_ptr + r_slot + slot_at, cache_modifier=".cg")
        tl.store(out_at, total.to(out_at.dtype.element_ty), mask=mask)
        tl.store(counts_ptr + t, 0)


@triton.jit
def _make_tile(a0, a1, a2, a3, b0, b1, b2, b3, x_ptr, out_ptr, ws_ptr, counts_ptr, M, N0, N1,
               stride_xm, stride_om, one, nb, t, steps, start, end, first_tile, tiles0, m_tiles,
               q, base, span, sk_programs, SHARE: tl.constexpr, FMT0: tl.constexpr,
               FMT1: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               W_AS_B: tl.constexpr, F32_DOT: tl.constexpr):
    """Steps [start, end) of tile t (see _gemm_kernel): stored, or with SHARE, where they are a
    piece of the tile, added to its other pieces (_add_piece)."""
    t_start = t * steps
    k_first = (tl.maximum(start, t_start) - t_start) * BK
    k_end = (tl.minimum(end, t_start + steps) - t_start) * BK
    in_b = t >= tiles0
    local = tl.where(in_b, t - tiles0, t)
    n_part = tl.where(in_b, N1, N0)
    m_ids = (local % m_tiles) * BM + tl.arange(0, BM)
    row_ids = (local // m_tiles) * BN + tl.arange(0, BN)
    # Rows past N read row N-1 (valid memory, no masks in the loop); only stores are masked.
    rows = tl.minimum(row_ids, n_part - 1).to(tl.int64)[:, None, None]
    # Tiles of x: rows past M read row M-1, and their columns of out are not stored.
    x_row_at = x_ptr + tl.minimum(m_ids, M - 1).to(tl.int64) * stride_xm
    if W_AS_B:
        x_at = x_row_at[:, None] + tl.arange(0, BK)[None, :]  # [BM, BK]
        m = m_ids[:, None]
        n = row_ids[None, :]
        slot_at = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    else:
        x_at = x_row_at[None, :] + tl.arange(0, BK)[:, None]  # x^T [BK, BM]
        m = m_ids[None, :]
        n = row_ids[:, None]
        slot_at = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
    if FMT1 < 0:
        acc = _tile_sum(a0, a1, a2, a3, rows, nb, k_first, k_end, x_at, one, FMT0, BM, BN, BK,
                        W_AS_B, F32_DOT)
    elif in_b:
        acc = _tile_sum(b0, b1, b2, b3, rows, nb, k_first, k_end, x_at, one, FMT1, BM, BN, BK,
                        W_AS_B, F32_DOT)
    else:
        acc = _tile_sum(a0, a1, a2, a3, rows, nb, k_first, k_end, x_at, one, FMT0, BM, BN, BK,
                        W_AS_B, F32_DOT)
    out_at = out_ptr + m.to(tl.int64) * stride_om + (n + tl.where(in_b, N0, 0))
    mask = (n < n_part) & (m < M)
    whole = (k_first == 0) & (k_end == steps * BK)
    if SHARE:
        if whole:
            tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            _add_piece(acc, ws_ptr, counts_ptr, out_at, mask, t, t_start, steps, first_tile, q,
                       base, span, sk_programs, slot_at, BM * BN)
    else:
        tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(a0, a1, a2, a3, b0, b1, b2, b3, x_ptr, out_ptr, ws_ptr, counts_ptr, M, N0, N1,
                 K, stride_xm, stride_om, one_bits, dp_tiles, sk_programs, SHARE: tl.constexpr,
                 FMT0: tl.constexpr, FMT1: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, W_AS_B: tl.constexpr, F32_DOT: tl.constexpr):
    """out[:, :N0] = x @ A^T and out[:, N0:N0+N1] = x @ B^T (FMT1 < 0: A alone), in tiles of
    BM rows of x by BN rows of W: tile t < tiles0 of A, else t - tiles0 of B, each numbered
    n_tile * m_tiles + m_tile (m varies fastest: programs that read one weight tile run together
    and share it in L2). A tile's work is `steps` K steps of BK.

    Programs below ``dp_tiles`` make tile ``pid`` whole. With SHARE, the other ``sk_programs``
    share the remaining tiles' steps evenly (stream-K: program q takes steps
    [q*span/sk, (q+1)*span/sk) of them, crossing tiles), so the grid ends together however few
    tiles there are. A tile made in pieces: each piece stores its f32 sum in the workspace (slot
    2q for the program's first tile, 2q+1 for its last) and counts itself in ``counts_ptr[t]``;
    the piece that counts last adds the slots in program order (the same sum whoever arrives
    last), stores the tile and sets the count back to 0 for the next launch."""
    pid = tl.program_id(0)
    steps = K // BK
    m_tiles = tl.cdiv(M, BM)
    tiles0 = m_tiles * tl.cdiv(N0, BN)
    one = one_bits
    nb = K // 256
    if SHARE:
        tiles = tiles0 + m_tiles * tl.cdiv(N1, BN)
        base = dp_tiles * steps  # the first step of the shared work
        span = (tiles - dp_tiles).to(tl.int64) * steps
        q = pid - dp_tiles
        start = tl.where(q < 0, pid * steps, base + (q * span // sk_programs).to(tl.int32))
        end = tl.where(q < 0, (pid + 1) * steps,
                       base + ((q + 1) * span // sk_programs).to(tl.int32))
        first_tile = start // steps
        for t in range(first_tile, (end - 1) // steps + 1):
            _make_tile(a0, a1, a2, a3, b0, b1, b2, b3, x_ptr, out_ptr, ws_ptr, counts_ptr, M, N0,
                       N1, stride_xm, stride_om, one, nb, t, steps, start, end, first_tile,
                       tiles0, m_tiles, q, base, span, sk_programs, SHARE, FMT0, FMT1, BM, BN,
                       BK, W_AS_B, F32_DOT)
    else:
        _make_tile(a0, a1, a2, a3, b0, b1, b2, b3, x_ptr, out_ptr, ws_ptr, counts_ptr, M, N0, N1,
                   stride_xm, stride_om, one, nb, pid, steps, pid * steps, (pid + 1) * steps,
                   pid, tiles0, m_tiles, 0, 0, 1, 1, SHARE, FMT0, FMT1, BM, BN, BK, W_AS_B,
                   F32_DOT)
# fmt: on


def quant_gemm(
    x: torch.Tensor,
    weight: PackedWeight,
    *,
    tile: GemmTile | None = None,
    plan: GemmPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for x [M, k] (bf16 or f16) and a Q4_K or Q6_K PackedWeight W [n, k]: [M, n]
    in x's dtype, accumulated in f32. ``out`` (an [M, n] tensor of x's dtype with contiguous
    rows, such as a column slice of a wider output) receives the result in place. ``plan``
    (or ``tile``, with the default schedule) overrides `gemm_plan`."""
    if plan is None and tile is not None:
        plan = GemmPlan(tile)
    return quant_gemm_parts(x, (weight,), plan=plan, out=out)


def quant_gemm_parts(
    x: torch.Tensor,
    parts: Sequence[PackedWeight],
    *,
    plan: GemmPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ [W0; W1].T`` for one or two stacked Q4_K / Q6_K parts of the same k, in one launch
    whatever their formats (the 8B's q|k in Q4_K with v in Q6_K: v's tiles fill multiprocessors
    that q|k's leave idle): [M, n0 + n1], each part's product in its own columns."""
    if not 1 <= len(parts) <= 2:
        raise MetallicError(f"quant_gemm multiplies one or two stacked parts, not {len(parts)}")
    for weight in parts:
        if weight.ggml_type not in GEMM_TYPES:
            raise MetallicError(f"quant_gemm reads Q4_K and Q6_K, not {weight.ggml_type.name}")
    k = parts[0].k
    if any(p.k != k for p in parts):
        raise MetallicError(f"stacked parts must share k: {[p.k for p in parts]}")
    n = sum(p.n for p in parts)
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in _X_DTYPES:
        raise MetallicError(f"x must be bf16 or f16 [M, {k}], got {x.dtype} {list(x.shape)}")
    _check_device(x)
    if any(x.device != p.device for p in parts):
        raise MetallicError(f"x is on {x.device} but the weight is on {parts[0].device}")
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
    plan = plan or gemm_plan(m, parts)
    tile = plan.tile
    if x.stride(1) != 1:
        x = x.contiguous()
    m_tiles = triton.cdiv(m, tile.bm)
    tiles = sum(m_tiles * triton.cdiv(p.n, tile.bn) for p in parts)
    steps = k // tile.bk
    dp_tiles, sk_programs = _schedule(plan, tiles, steps, 4 * m * n, sm_count(x.device))
    workspace = counts = out  # unread unless some program shares its tiles
    if sk_programs:
        workspace = torch.empty(
            2 * sk_programs * tile.bm * tile.bn, dtype=torch.float32, device=x.device
        )
        counts = _zero_counts(tiles, x.device)
    second = parts[1] if len(parts) == 2 else parts[0]
    _gemm_kernel[(dp_tiles + sk_programs,)](
        *_planes(parts[0]), *_planes(second), x, out, workspace, counts, m, parts[0].n,
        second.n if len(parts) == 2 else 0, k, x.stride(0), out.stride(0), _ONE_BITS, dp_tiles,
        max(1, sk_programs), SHARE=sk_programs > 0,
        FMT0=_FMT_IDS[parts[0].ggml_type], FMT1=_FMT_IDS[second.ggml_type] if len(parts) == 2
        else -1, BM=tile.bm, BN=tile.bn, BK=tile.bk, W_AS_B=tile.w_as_b,
        F32_DOT=interpreting() and x.dtype == torch.bfloat16,
        num_warps=tile.warps, num_stages=tile.stages, maxnreg=tile.registers or None,
    )  # fmt: skip
    return out


_FMT_IDS = {T.Q4_K: 0, T.Q6_K: 1}


def _planes(weight: PackedWeight) -> list[torch.Tensor]:
    """The kernel's four plane arguments of a part (Q6_K's scales read as int32)."""
    if weight.ggml_type == T.Q4_K:
        return [weight.planes[0]] * 4
    ql, qh, scales, d = weight.planes
    return [ql, qh, scales.view(torch.int32), d]


def _schedule(
    plan: GemmPlan, tiles: int, steps: int, split_bytes: int, sms: int
) -> tuple[int, int]:
    """(programs that make one tile whole, programs that share the other tiles' K steps)."""
    if plan.stream:
        slots = sms * plan.per_sm
        # Whole waves but the last run single tiles; the last wave and the rest are shared
        # (sharing only the rest would leave its programs' pieces half a wave apart).
        dp_tiles = max(0, tiles // slots - 1) * slots
        if (tiles - dp_tiles) % slots == 0:
            return tiles, 0
        return dp_tiles, min(slots, (tiles - dp_tiles) * steps)
    splits = plan.splits or _auto_splits(tiles, steps, split_bytes, sms)
    return (tiles, 0) if splits == 1 else (0, tiles * min(splits, steps))


def _auto_splits(tiles: int, steps: int, split_bytes: int, sms: int) -> int:
    """Pieces of K per tile: all of K, unless the tiles leave multiprocessors idle (the 8B's
    attn_output at 512 rows: 64 tiles of 256 x 128 on 132 SMs); then K is split until the grid
    about fills them, as far as f32 partial sums of ``split_bytes`` a split stay within
    _MAX_SCRATCH_BYTES."""
    splits = min(steps, max(1, sms // tiles))
    return max(1, min(splits, _MAX_SCRATCH_BYTES // split_bytes))


_COUNTS: dict[torch.device, torch.Tensor] = {}


def _zero_counts(tiles: int, device: torch.device) -> torch.Tensor:
    """A per-tile count of pieces, all 0: the kernel sets each back to 0 once its tile is made,
    so one buffer per device serves every launch (launches on one stream run one at a time).
    Made during a CUDA graph capture, a buffer would be zeroed only by the graph's replays:
    there a fresh one is made for the launch and not kept."""
    counts = _COUNTS.get(device)
    if counts is None or counts.numel() < tiles:
        fresh = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fresh
        _COUNTS[device] = counts = fresh
    return counts
