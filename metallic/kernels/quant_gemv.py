"""Decode products (1 to DP4A_MAX_ROWS rows of x) against K-quant weights with 8-bit integer
dot products.

At one row of x a quantized matmul reads each weight once and does one multiply-add with it, so
its cost is the instructions that turn a weight's bits into that multiply-add; a decode step of
M sequences multiplies M rows, and the weights are read once for all of them. The float path
(quant_matmul's FMA mode) unpacks, converts and multiplies every weight in f32; here x is
rounded once per product to signed 8-bit integers with one f32 scale per 32 elements (as
llama.cpp's GPU backend does with its q8_1 blocks), the weights' quants stay integers, and
``dp4a`` multiplies four quant bytes by four x bytes and adds them in one instruction. The float
scales are applied once per 16 or 32-element sub-block:

    sum_l (d*sc*q_l - dmin*m) * dx*xq_l = dx * (d*sc * sum_l q_l*xq_l - dmin*m * sum_l xq_l)

Two kernel families (benchmarks/sass.py counts their sm_90 instructions per weight):

- "owner": each thread owns whole (row, super-block) pairs, so a block's bytes arrive in 16-byte
  loads, its scales are decoded once per 256 weights and the thread's x words serve all its
  rows. A 32-bit word of Q4_K quants (eight weights) takes two masks and two dp4a (the high
  nibbles multiplied in place, 16 times their value): in the main loop about 1.0-1.1
  instructions per weight in all, 1.4-1.6 for Q6_K (Triton 3.9-3.6). Q6_K's default.
- "staged" (Q4_K): the same, but eight neighbouring threads load a block's 128 quant bytes
  contiguously and Triton hands them to their owner through shared memory (about 1.4-1.6
  instructions per weight): the owner's strided 16-byte loads use half a sector each, and on an
  H200 the staged kernel is 10-25% faster. Q4_K's default.
- "tile": threads share a super-block's words in [rows, super-blocks, words] tiles and decode
  its scales per element; about 2.0 (Q4_K) and 2.6 (Q6_K) instructions per weight. One row of
  x only; no longer a default (default_geometry has the measurements).

The owner kernels take M rows of x (a constexpr): a thread's quant words are masked once and
each row adds its dp4a, x loads and scale arithmetic: in the main loop 1.6, 2.2, 3.4-3.7 and
6.1-6.9 instructions per weight at 1, 2, 4 and 8 rows (Triton 3.6, benchmarks/sass.py --rows;
Q6_K at 8 rows spills a little, 28 local loads and stores in a loop of 1700). Each row keeps its own
accumulators, added to in the same order whatever M is, so a row's result is the same bits
alone or among others (batch invariance: a sequence decodes the same in any batch).

Under TRITON_INTERPRET=1 (no PTX) ``dp4a`` is emulated with shifts and multiplies; integer
arithmetic is exact, so the emulation and the instruction give identical sums.

Layouts are metallic.kernels.packing's: Q4_K in place (36 words a block), Q6_K in planes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from metallic.kernels import cuda_gemv
from metallic.kernels.packing import PackedWeight
from metallic.kernels.pdl import pdl_launch, prefetch_enabled, prefetch_l2, wait_for_inputs
from metallic.kernels.quant_matmul import interpreting, sum_splits
from metallic.kernels.rounding import X_BLOCK, empty_quantized_x, store_rounded_blocks

T = GGMLQuantizationType

GEMV_TYPES = (T.Q4_K, T.Q6_K)
DP4A_TYPES = (*GEMV_TYPES, T.Q8_0, T.Q5_0, T.Q4_0)  # the last three: kernels/gemv_blocks.py
DP4A_MIN_BYTES = 8 << 20  # below this a one-row product keeps the float kernel (uses_dp4a)
DP4A_MAX_ROWS = 8  # rows of x the dp4a kernels take in one pass over the weights
DP4A_F32_MAX_ROWS = 32  # f32 rows (an output head's) take them up to this, 8 a pass (uses_dp4a)
_QUANTIZE_BLOCKS = 32  # x blocks per program of the rounding kernel
_HIGH_NIBBLES = tl.constexpr(-0x0F0F0F10)  # 0xF0F0F0F0 as a signed 32-bit word


# fmt: off
@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr, A_UNSIGNED: tl.constexpr = False):
    """c + the dot product of a's and b's four signed bytes (a's unsigned with A_UNSIGNED)."""
    if ASM:
        op: tl.constexpr = "dp4a.u32.s32" if A_UNSIGNED else "dp4a.s32.s32"
        return tl.inline_asm_elementwise(op + " $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for k in tl.static_range(4):
            a_k = (a >> (8 * k)) & 0xFF if A_UNSIGNED else (a << (24 - 8 * k)) >> 24
            c += a_k * ((b << (24 - 8 * k)) >> 24)
        return c


@triton.jit
def _quantize_x_kernel(x_ptr, xq_ptr, dx_ptr, xs_ptr, n_blocks, BLOCKS: tl.constexpr,
                       PDL: tl.constexpr):
    """Blocks of 32 elements of x: int8 quants, their f32 scale and each half's sum of quants."""
    wait_for_inputs(PDL)
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    ok = b < n_blocks
    e = tl.arange(0, 32)
    x = tl.load(x_ptr + b[:, None] * 32 + e[None, :], mask=ok[:, None], other=0.0)
    store_rounded_blocks(x.to(tl.float32), b, ok, xq_ptr, dx_ptr, xs_ptr)


@triton.jit
def _rows(BN: tl.constexpr, N):
    """This program's rows (clamped to N - 1: loads need no mask) and which of them exist."""
    ids = tl.program_id(0) * BN + tl.arange(0, BN)
    return ids, tl.minimum(ids, N - 1).to(tl.int64)


@triton.jit
def _store(out_ptr, acc, ids, N, PARTIAL: tl.constexpr):
    """Rows' sums to out, or to this K split's row of the f32 scratch."""
    if PARTIAL:
        out_ptr += tl.program_id(1) * N
    tl.store(out_ptr + ids, acc.to(out_ptr.dtype.element_ty), mask=ids < N)


@triton.jit
def _gemv_q4_k_kernel(w_ptr, h_ptr, xq_ptr, dx_ptr, xs_ptr, out_ptr, N, row_words, sb_per_split,
                      BN: tl.constexpr, S: tl.constexpr, PARTIAL: tl.constexpr,
                      ASM: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """out[rows] over super-blocks [pid1 * sb_per_split, +sb_per_split), S at a time.

    Tiles are [BN rows, S super-blocks, 4 chunks j, 8 words w]: byte b of quant word w of chunk
    j holds elements 64j + 4w + b (low nibble, sub-block 2j) and 64j + 32 + 4w + b (high
    nibble, sub-block 2j + 1); x's int8 word 16j + w (+ 8) holds the same elements of x.
    """
    wait_for_inputs(PDL)
    ids, rows = _rows(BN, N)
    r = rows[:, None, None, None]
    j = tl.arange(0, 4)[None, None, :, None]
    w = tl.arange(0, 8)[None, None, None, :]
    jh = tl.arange(0, 4)[None, None, :]
    upper = jh >= 2  # sub-blocks 4..7 keep their scales in two places
    low_mask = tl.where(upper, 15, 63)
    top_mask = tl.where(upper, 0x30, 0)
    shift = 16 * (jh % 2)
    acc = tl.zeros((BN, S, 4), dtype=tl.float32)
    first = tl.program_id(1) * sb_per_split
    for s in tl.range(first, first + sb_per_split, S, num_stages=STAGES):
        sb = s + tl.arange(0, S)[None, :, None, None]
        words = tl.load(w_ptr + r * row_words + sb * 36 + 4 + 8 * j + w)
        xw = sb * 64 + 16 * j + w
        lo = _dp4a(words & 0x0F0F0F0F, tl.load(xq_ptr + xw), 0, ASM)
        hi = _dp4a((words >> 4) & 0x0F0F0F0F, tl.load(xq_ptr + xw + 8), 0, ASM)
        dot_lo = tl.sum(lo, axis=3).to(tl.float32)  # [BN, S, 4]
        dot_hi = tl.sum(hi, axis=3).to(tl.float32)
        # Scales of sub-blocks 2j and 2j + 1 (see quant_matmul._k_scales for the bit layout).
        sb3 = s + tl.arange(0, S)[None, :, None]
        base = rows[:, None, None] * row_words + sb3 * 36
        w1 = tl.load(w_ptr + base + 1)
        w2 = tl.load(w_ptr + base + 2)
        w3 = tl.load(w_ptr + base + 3)
        d = tl.load(h_ptr + 2 * base).to(tl.float32)
        dmin = tl.load(h_ptr + 2 * base + 1).to(tl.float32)
        xb = sb3 * 8 + 2 * jh  # x block of sub-block 2j
        for par in tl.static_range(2):
            sh = shift + 8 * par
            sc = ((tl.where(upper, w3, w1) >> sh) & low_mask) | ((w1 >> (sh + 2)) & top_mask)
            m = (((tl.where(upper, w3, w2) >> (sh + 4 * upper.to(tl.int32))) & low_mask)
                 | ((w2 >> (sh + 2)) & top_mask))
            dx = tl.load(dx_ptr + xb + par)
            xsum = tl.load(xs_ptr + 2 * (xb + par)) + tl.load(xs_ptr + 2 * (xb + par) + 1)
            dot = dot_lo if par == 0 else dot_hi
            acc += dx * (d * sc.to(tl.float32) * dot - dmin * m.to(tl.float32) * xsum)
    _store(out_ptr, tl.sum(tl.sum(acc, axis=2), axis=1), ids, N, PARTIAL)


@triton.jit
def _words(t, BN: tl.constexpr, S: tl.constexpr):
    """The four words of the last axis of t [BN, S, 4], each [BN, S] (held by one thread)."""
    even, odd = tl.split(tl.reshape(t, (BN, S, 2, 2)))
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return w0, w1, w2, w3


@triton.jit
def _halves(t, W: tl.constexpr):
    """t [BN, S, W] as its first and second halves along the last axis."""
    BN: tl.constexpr = t.shape[0]
    S: tl.constexpr = t.shape[1]
    return tl.split(tl.permute(tl.reshape(t, (BN, S, 2, W // 2)), (0, 1, 3, 2)))


@triton.jit
def _pick(w0, w1, w2, w3, i: tl.constexpr):
    """w_i, for a compile-time i."""
    return w0 if i == 0 else w1 if i == 1 else w2 if i == 2 else w3


@triton.jit
def _zeros_rows(BN: tl.constexpr, S: tl.constexpr, dtype: tl.constexpr, M: tl.constexpr):
    """M zero [BN, S] tensors: one accumulator per row of x, each added to in the same order
    whatever M is, so a row's sum does not depend on the rows beside it."""
    out = ()
    for _ in tl.static_range(M):
        out += (tl.zeros((BN, S), dtype=dtype),)
    return out


@triton.jit
def _small_float(i):
    """i (int32, |i| < 2**22) as f32, exactly: an integer add and a float add instead of a
    conversion (a quarter-rate instruction, once per sub-block and row of x)."""
    return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0  # 1.5 * 2**23


@triton.jit
def _small_int(f):
    """f (f32 holding an integer, |f| < 2**22) as int32, exactly, without a conversion."""
    return (f + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _owner_start(N, sb_per_split, BN: tl.constexpr, S: tl.constexpr, PDL: tl.constexpr,
                 M: tl.constexpr):
    """An owner kernel's start: its inputs ready, its rows (see _rows), M zero [BN, S]
    accumulators (one per row of x) and its first super-block."""
    wait_for_inputs(PDL)
    ids, rows = _rows(BN, N)
    return ids, rows, _zeros_rows(BN, S, tl.float32, M), tl.program_id(1) * sb_per_split


@triton.jit
def _store_rows(out_ptr, accs, ids, N, out_stride, PARTIAL: tl.constexpr):
    """Each row of x's sums (accs: M [BN, S] tensors) to its row of out (out_stride apart), or
    to this K split's [M, N] slice of the f32 scratch [splits, M, N]."""
    for r in tl.static_range(len(accs)):
        if PARTIAL:
            at = out_ptr + (tl.program_id(1) * len(accs) + r) * N
        else:
            at = out_ptr + r * out_stride
        tl.store(at + ids, tl.sum(accs[r], axis=1).to(out_ptr.dtype.element_ty), mask=ids < N)


@triton.jit
def _prefetch_blocks(ptr, row, count, n_sb, sb_per_split, block_bytes, BN: tl.constexpr):
    """L2 prefetch of a program's share of a plane of `block_bytes` bytes a super-block: its
    super-blocks [pid1 * sb_per_split, +sb_per_split) of rows [row, row + count): one range
    where a program takes whole rows, else one a row."""
    row = row.to(tl.int64)
    row_bytes = n_sb.to(tl.int64) * block_bytes
    if sb_per_split == n_sb:
        prefetch_l2(ptr, row * row_bytes, count * row_bytes)
    else:
        first = tl.program_id(1).to(tl.int64) * sb_per_split * block_bytes
        for i in tl.static_range(BN):
            if i < count:
                prefetch_l2(ptr, (row + i) * row_bytes + first, sb_per_split * block_bytes)


@triton.jit
def _byte(word, k: tl.constexpr):
    """Byte k of word, unsigned."""
    return (word >> (8 * k)) & 0xFF if k < 3 else (word >> 24) & 0xFF


@triton.jit
def _gemv_q4_k_owner_kernel(w_ptr, w2_ptr, xq_ptr, dx_ptr, xs_ptr, out_ptr, N, n_first, n_sb,
                            sb_per_split, out_stride, BN: tl.constexpr, S: tl.constexpr,
                            PARTIAL: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
                            STAGED: tl.constexpr = False, HOIST: tl.constexpr = True,
                            M: tl.constexpr = 1, PREFETCH: tl.constexpr = False):
    """out[:M, rows] over super-blocks [pid1 * sb_per_split, +sb_per_split), S at a time, for M
    rows of x (each row's arithmetic the same whatever M: see _x_rows).

    Each thread owns whole (row, super-block) pairs of a [BN, S] tile: its 144 bytes arrive in
    nine 16-byte loads, the scales are decoded once for 256 weights, and the thread's x words
    (the same super-blocks for all its rows) stay in registers across rows. Byte b of quant
    word 8j + w holds elements 64j + 4w + b (low nibble, sub-block 2j) and 64j + 32 + 4w + b
    (high nibble, sub-block 2j + 1): high nibbles are multiplied in place (16 times their value)
    and the 16 is divided out of the sub-block's scale. With STAGED the 128 bytes of quants are
    loaded by eight neighbouring threads, contiguous, and handed to their owner through shared
    memory. Output rows from n_first on (a multiple of BN) are the rows of a second matrix at
    w2_ptr: gate and up in one launch. A masked quant word serves all M rows of x: two dp4a
    per row. PREFETCH: the program's blocks are asked of the L2 before the wait on the previous
    kernel (pdl.prefetch_l2).
    """
    if PREFETCH:
        row = tl.program_id(0) * BN
        count = tl.minimum(BN, N - row)
        blocks = w_ptr
        if row >= n_first:
            blocks = w2_ptr
            row -= n_first
        _prefetch_blocks(blocks, row, count, n_sb, sb_per_split, 144, BN)
    ids, rows, accs, first = _owner_start(N, sb_per_split, BN, S, PDL, M)
    if tl.program_id(0) * BN >= n_first:
        w_ptr = w2_ptr
        rows -= n_first
    quad = tl.arange(0, 4)[None, None, :]
    for s in tl.range(first, first + sb_per_split, S):
        sb = s + tl.arange(0, S)[None, :]
        blk = (w_ptr + (rows[:, None] * n_sb + sb) * 36)[:, :, None]
        x_sb = (s + tl.arange(0, S))[:, None]
        x_at = xq_ptr + x_sb * 64 + tl.arange(0, 4)[None, :]  # [S, 4]
        dx_pair = dx_ptr + x_sb * 8 + tl.arange(0, 2)[None, :]  # [S, 2]
        xs_quad = xs_ptr + x_sb * 16 + tl.arange(0, 4)[None, :]  # [S, 4]
        head, sc_lo, m_lo, packed_hi = _words(tl.load(blk + quad), BN, S)
        d = (head & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = (head >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        # Sub-blocks 0-3 keep 6 bits a byte; 4-7 a nibble plus the top two bits of 0-3's bytes.
        sc_hi = (packed_hi & 0x0F0F0F0F) | ((sc_lo >> 2) & 0x30303030)
        m_hi = ((packed_hi >> 4) & 0x0F0F0F0F) | ((m_lo >> 2) & 0x30303030)
        sc_lo &= 0x3F3F3F3F
        m_lo &= 0x3F3F3F3F
        if STAGED:
            quants = tl.load(blk + 4 + tl.arange(0, 32)[None, None, :])
            first_half, second_half = _halves(quants, 32)
            chunk0, chunk1 = _halves(first_half, 16)
            chunk2, chunk3 = _halves(second_half, 16)
        else:  # all loads first, so each thread keeps its 128 bytes of quants in flight at once
            q00 = tl.load(blk + 4 + quad)
            q01 = tl.load(blk + 8 + quad)
            q10 = tl.load(blk + 12 + quad)
            q11 = tl.load(blk + 16 + quad)
            q20 = tl.load(blk + 20 + quad)
            q21 = tl.load(blk + 24 + quad)
            q30 = tl.load(blk + 28 + quad)
            q31 = tl.load(blk + 32 + quad)
            if HOIST:  # keeps ptxas from spreading the loads among the arithmetic
                tl.debug_barrier()
        scaled = _zeros_rows(BN, S, tl.float32, M)  # per row of x: sum of dx * sc * dot
        mins = _zeros_rows(BN, S, tl.float32, M)  # per row of x: sum of dx * m * sum(x)
        for j in tl.static_range(4):
            dots_lo = _zeros_rows(BN, S, tl.int32, M)
            dots_hi = _zeros_rows(BN, S, tl.int32, M)
            for half in tl.static_range(2):
                if STAGED:
                    quads = _halves(_pick(chunk0, chunk1, chunk2, chunk3, j), 8)[half]
                elif half == 0:
                    quads = _pick(q00, q10, q20, q30, j)
                else:
                    quads = _pick(q01, q11, q21, q31, j)
                low_nibbles = quads & 0x0F0F0F0F  # masked once for all rows of x
                high_nibbles = quads & _HIGH_NIBBLES
                new_lo = ()
                new_hi = ()
                for r in tl.static_range(M):
                    xw = x_at + r * n_sb * 64 + 16 * j + 4 * half
                    new_lo += (_dot4(low_nibbles, tl.load(xw)[None, :, :], dots_lo[r], BN, S,
                                     ASM),)  # fmt: skip
                    new_hi += (_dot4(high_nibbles, tl.load(xw + 8)[None, :, :], dots_hi[r], BN, S,
                                     ASM, True),)  # fmt: skip
                dots_lo, dots_hi = new_lo, new_hi
            scs = sc_lo if j < 2 else sc_hi
            ms = m_lo if j < 2 else m_hi
            sc_even = _byte(scs, (2 * j) % 4).to(tl.float32)
            sc_odd = _byte(scs, (2 * j + 1) % 4).to(tl.float32) * 0.0625  # the high nibbles' 16
            m_even = _byte(ms, (2 * j) % 4).to(tl.float32)
            m_odd = _byte(ms, (2 * j + 1) % 4).to(tl.float32)
            new_scaled = ()
            new_mins = ()
            for r in tl.static_range(M):
                # x's scales of sub-blocks 2j and 2j + 1 in one load, their half sums in another
                dx_even, dx_odd = tl.split(tl.load(dx_pair + r * n_sb * 8 + 2 * j)[None, :, :])
                h0, h1, h2, h3 = _words(tl.load(xs_quad + r * n_sb * 16 + 4 * j)[None, :, :], 1, S)
                # sub-block 2j first, then 2j + 1, as separate sums
                row_scaled = scaled[r] + (dx_even * sc_even) * _small_float(dots_lo[r])
                row_mins = mins[r] + (dx_even * (h0 + h1)) * m_even
                new_scaled += (row_scaled + (dx_odd * sc_odd) * _small_float(dots_hi[r]),)
                new_mins += (row_mins + (dx_odd * (h2 + h3)) * m_odd,)
            scaled, mins = new_scaled, new_mins
        new_accs = ()
        for r in tl.static_range(M):
            new_accs += (accs[r] + (d * scaled[r] - dmin * mins[r]),)
        accs = new_accs
    _store_rows(out_ptr, accs, ids, N, out_stride, PARTIAL)


@triton.jit
def _gemv_q6_k_kernel(ql_ptr, qh_ptr, sc_ptr, d_ptr, xq_ptr, dx_ptr, xs_ptr, out_ptr, N, n_sb,
                      sb_per_split, BN: tl.constexpr, S: tl.constexpr, PARTIAL: tl.constexpr,
                      ASM: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """out[rows] over super-blocks [pid1 * sb_per_split, +sb_per_split), S at a time.

    Tiles are [BN rows, S super-blocks, 2 halves h, 2 sixteens i, 4 words t]; a = 4i + t. Byte b
    of low word a (of half h's 16 words) and of its high word a hold element 128h + 4a + b (low
    nibble, high bits 0-1), 128h + 64 + 4a + b (high nibble, bits 4-5); low word 8 + a holds
    128h + 32 + 4a + b and 128h + 96 + 4a + b (high bits 2-3 and 6-7). Element group c (of
    32, 128h + 32c..) takes scale 8h + 2c + i; the stored quant is q + 32.
    """
    wait_for_inputs(PDL)
    ids, rows = _rows(BN, N)
    r = rows[:, None, None, None, None]
    h = tl.arange(0, 2)[None, None, :, None, None]
    a = 4 * tl.arange(0, 2)[None, None, None, :, None] + tl.arange(0, 4)[None, None, None, None, :]
    h4 = tl.arange(0, 2)[None, None, :, None]
    i4 = tl.arange(0, 2)[None, None, None, :]
    acc = tl.zeros((BN, S, 2, 2), dtype=tl.float32)
    first = tl.program_id(1) * sb_per_split
    for s in tl.range(first, first + sb_per_split, S, num_stages=STAGES):
        sb = s + tl.arange(0, S)[None, :, None, None, None]
        low_at = ql_ptr + r * (n_sb * 32) + sb * 32 + 16 * h + a
        low_a = tl.load(low_at)
        low_b = tl.load(low_at + 8)
        high = tl.load(qh_ptr + r * (n_sb * 16) + sb * 16 + 8 * h + a)
        sb4 = s + tl.arange(0, S)[None, :, None, None]
        r4 = rows[:, None, None, None]
        d = tl.load(d_ptr + r4 * n_sb + sb4).to(tl.float32)
        for c in tl.static_range(4):
            low = low_a if c % 2 == 0 else low_b
            if c >= 2:
                low = low >> 4
            q = (low & 0x0F0F0F0F) | (((high >> (2 * c)) & 0x03030303) << 4)
            xb = sb * 8 + 4 * h + c  # the x block of element group c
            dot = tl.sum(_dp4a(q, tl.load(xq_ptr + 8 * xb + a), 0, ASM), axis=4)
            xb4 = sb4 * 8 + 4 * h4 + c
            xsum = tl.load(xs_ptr + 2 * xb4 + i4)
            sc = tl.load(sc_ptr + r4 * (n_sb * 16) + sb4 * 16 + 8 * h4 + 2 * c + i4)
            dx = tl.load(dx_ptr + xb4)
            acc += (d * sc.to(tl.float32)) * (dx * (dot.to(tl.float32) - 32.0 * xsum))
    _store(out_ptr, tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1), ids, N, PARTIAL)

@triton.jit
def _sbyte(word, k: tl.constexpr, ASM: tl.constexpr):
    """Byte k of word, signed: one prmt (byte k, then its sign replicated) instead of two shifts."""
    if not ASM:
        return (word << (24 - 8 * k)) >> 24
    elif k == 0:  # prmt's selector nibbles: byte k, then 8 + k (its sign) three times
        return _asm1(word, "prmt.b32 $0, $1, 0, 0x8880;")
    elif k == 1:
        return _asm1(word, "prmt.b32 $0, $1, 0, 0x9991;")
    elif k == 2:
        return _asm1(word, "prmt.b32 $0, $1, 0, 0xAAA2;")
    else:
        return _asm1(word, "prmt.b32 $0, $1, 0, 0xBBB3;")


@triton.jit
def _low_nibbles_with(low, high, ASM: tl.constexpr):
    """Each byte's low nibble from low and high nibble from high: one lop3 (a bit-select; the
    compiler would otherwise fold the callers' masks into extra shifts and masks)."""
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x0F0F0F0F, 0xE4;", "=r,r,r",
                                         [low, high], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return (low & 0x0F0F0F0F) | (high & _HIGH_NIBBLES)


@triton.jit
def _asm1(word, asm: tl.constexpr):
    """One PTX instruction on each 32-bit word."""
    return tl.inline_asm_elementwise(asm, "=r,r", [word], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _dot4(q, x, c, BN: tl.constexpr, S: tl.constexpr, ASM: tl.constexpr,
          Q_UNSIGNED: tl.constexpr = False):
    """c + the dot products of the bytes of q [BN, S, 4] (signed, or unsigned with Q_UNSIGNED)
    and the signed bytes of x [1, S, 4], per [BN, S]: four dp4a, words 0 to 3."""
    if ASM:
        q0, q1, q2, q3 = _words(q, BN, S)
        x0, x1, x2, x3 = _words(x, 1, S)
        c = _dp4a(q0, x0, c, ASM, Q_UNSIGNED)
        c = _dp4a(q1, x1, c, ASM, Q_UNSIGNED)
        c = _dp4a(q2, x2, c, ASM, Q_UNSIGNED)
        return _dp4a(q3, x3, c, ASM, Q_UNSIGNED)
    else:  # the sixteen byte products at once (exact integers: the same sum in any order)
        k = tl.arange(0, 4)[None, None, None, :]
        q4 = q[:, :, :, None]
        q_bytes = (q4 >> (8 * k)) & 0xFF if Q_UNSIGNED else (q4 << (24 - 8 * k)) >> 24
        x_bytes = (x[:, :, :, None] << (24 - 8 * k)) >> 24
        return c + tl.sum(tl.sum(q_bytes * x_bytes, axis=3), axis=2)


@triton.jit
def _gemv_q6_k_owner_kernel(ql_ptr, qh_ptr, sc_ptr, d_ptr, xq_ptr, dx_ptr, xs_ptr, out_ptr, N,
                            n_sb, sb_per_split, out_stride, BN: tl.constexpr, S: tl.constexpr,
                            PARTIAL: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
                            HOIST: tl.constexpr = True, M: tl.constexpr = 1,
                            PREFETCH: tl.constexpr = False):
    """out[:M, rows] over super-blocks [pid1 * sb_per_split, +sb_per_split), S at a time, for M
    rows of x (each row's arithmetic the same whatever M).

    As the Q4_K kernel, each thread owns whole (row, super-block) pairs. For half h and words
    a = 4p + t (p, t < 4), low words 16h + a and 16h + 8 + a and high word 8h + a hold the
    elements 128h + 32c + 4a + b of groups c = 0..3 (low nibbles of the first low word with
    high bits 0-1, of the second with bits 2-3, high nibbles with bits 4-5 and 6-7): words t of
    sub-block 8h + 2c + p. Each quant byte is one bit-select of a nibble and a masked, shifted
    high word, made once for all M rows. The stored quant is q + 32: a sub-block's dot starts
    at -32 * (its sum of x), an exact integer. PREFETCH: as the Q4_K kernel's, every plane.
    """
    if PREFETCH:
        row = tl.program_id(0) * BN
        count = tl.minimum(BN, N - row)
        _prefetch_blocks(ql_ptr, row, count, n_sb, sb_per_split, 128, BN)
        _prefetch_blocks(qh_ptr, row, count, n_sb, sb_per_split, 64, BN)
        _prefetch_blocks(sc_ptr, row, count, n_sb, sb_per_split, 16, BN)
        _prefetch_blocks(d_ptr, row, count, n_sb, sb_per_split, 2, BN)
    ids, rows, accs, first = _owner_start(N, sb_per_split, BN, S, PDL, M)
    quad = tl.arange(0, 4)[None, None, :]
    for s in tl.range(first, first + sb_per_split, S):
        sb = s + tl.arange(0, S)[None, :]
        at = rows[:, None] * n_sb + sb
        d = tl.load(d_ptr + at).to(tl.float32)
        sc0, sc1, sc2, sc3 = _words(tl.load(sc_ptr + at[:, :, None] * 4 + quad), BN, S)
        x_at = xq_ptr + sb[:, :, None] * 64 + quad
        xs_pair = xs_ptr + (s + tl.arange(0, S))[:, None] * 16 + tl.arange(0, 2)[None, :]
        # Words a = 4p + t of half h as the (2h + p)-th of each kind. Up to 4 rows of x all
        # loads first, so each thread keeps its 192 bytes of quants in flight at once; from 5
        # rows each half's loads come with it (registers: 8 rows of everything would spill).
        low_at = ql_ptr + at[:, :, None] * 32 + quad
        high_at = qh_ptr + at[:, :, None] * 16 + quad
        if M <= 4:
            low_a0, low_a1 = tl.load(low_at), tl.load(low_at + 4)
            low_a2, low_a3 = tl.load(low_at + 16), tl.load(low_at + 20)
            low_b0, low_b1 = tl.load(low_at + 8), tl.load(low_at + 12)
            low_b2, low_b3 = tl.load(low_at + 24), tl.load(low_at + 28)
            high0, high1 = tl.load(high_at), tl.load(high_at + 4)
            high2, high3 = tl.load(high_at + 8), tl.load(high_at + 12)
            if HOIST:  # keeps ptxas from spreading the loads among the arithmetic
                tl.debug_barrier()
        scaled = _zeros_rows(BN, S, tl.float32, M)  # per row of x: sum over groups of dx * t
        for h in tl.static_range(2):
            if M <= 4:
                low_a = (_pick(low_a0, low_a1, low_a2, low_a3, 2 * h),
                         _pick(low_a0, low_a1, low_a2, low_a3, 2 * h + 1))
                low_b = (_pick(low_b0, low_b1, low_b2, low_b3, 2 * h),
                         _pick(low_b0, low_b1, low_b2, low_b3, 2 * h + 1))
                high = (_pick(high0, high1, high2, high3, 2 * h),
                        _pick(high0, high1, high2, high3, 2 * h + 1))
            else:
                low_a = (tl.load(low_at + 16 * h), tl.load(low_at + 16 * h + 4))
                low_b = (tl.load(low_at + 16 * h + 8), tl.load(low_at + 16 * h + 12))
                high = (tl.load(high_at + 8 * h), tl.load(high_at + 8 * h + 4))
            for c in tl.static_range(4):
                # Per row of x: each sub-block's dot starts at -32 * its sum of x (one load for
                # both sub-blocks).
                starts_even = ()
                starts_odd = ()
                for r in tl.static_range(M):
                    xs_even, xs_odd = tl.split(
                        tl.load(xs_pair + r * n_sb * 16 + 8 * h + 2 * c)[None, :, :]
                    )
                    starts_even += (-32 * _small_int(xs_even),)
                    starts_odd += (-32 * _small_int(xs_odd),)
                ts = ()  # per row of x: sum over p of sc * dot
                for p in tl.static_range(2):
                    group = _q6_k_group(low_a[p], low_b[p], high[p], c, ASM)
                    sc = _sbyte(_pick(sc0, sc1, sc2, sc3, 2 * h + c // 2), 2 * (c % 2) + p, ASM)
                    new_ts = ()
                    for r in tl.static_range(M):
                        start = starts_even[r] if p == 0 else starts_odd[r]
                        dot = _dot4(group, tl.load(x_at + r * n_sb * 64 + 32 * h + 8 * c + 4 * p),
                                    start, BN, S, ASM)
                        new_ts += (dot * sc if p == 0 else ts[r] + dot * sc,)
                    ts = new_ts
                new_scaled = ()
                for r in tl.static_range(M):
                    dx = tl.load(dx_ptr + r * n_sb * 8 + sb * 8 + 4 * h + c)
                    new_scaled += (scaled[r] + dx * ts[r].to(tl.float32),)
                scaled = new_scaled
        new_accs = ()
        for r in tl.static_range(M):
            new_accs += (accs[r] + d * scaled[r],)
        accs = new_accs
    _store_rows(out_ptr, accs, ids, N, out_stride, PARTIAL)


@triton.jit
def _q6_k_group(low_a, low_b, high, c: tl.constexpr, ASM: tl.constexpr):
    """The quant bytes of element group c from its low words and high word (see the kernel)."""
    if c == 0:
        return _low_nibbles_with(low_a, (high & 0x33333333) << 4, ASM)  # bits 0-1 (and 4-5)
    elif c == 2:
        return _low_nibbles_with(low_a >> 4, high & 0x33333333, ASM)
    else:
        odd = (high & -0x33333334).to(tl.uint32, bitcast=True)  # 0xCCCCCCCC: bits 2-3, 6-7
        if c == 1:
            return _low_nibbles_with(low_b, (odd << 2).to(tl.int32, bitcast=True), ASM)
        else:
            return _low_nibbles_with(low_b >> 4, (odd >> 2).to(tl.int32, bitcast=True), ASM)

# fmt: on


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] or [M, K] (K a multiple of 32) as int8 quants, f32 scales of each 32 and f32 sums
    of each 16 quants ([K], [K/32], [K/16], with a leading M for [M, K]): what every dp4a
    product against it reads. Rows are stacked (row r's quants from r * K on, and so on) and
    rounded block by block in one launch, so a row rounds the same alone or among others."""
    if x.dim() not in (1, 2) or x.shape[-1] % X_BLOCK:
        raise ValueError(
            f"quantize_x: x must be [K] or [M, K] with K a multiple of 32, got {list(x.shape)}"
        )
    x = x.contiguous()
    rows, k = (1, x.shape[0]) if x.dim() == 1 else x.shape
    n_blocks = rows * k // X_BLOCK
    xq, dx, xs = empty_quantized_x(k, x.device, rows)
    if n_blocks:
        grid = (triton.cdiv(n_blocks, _QUANTIZE_BLOCKS),)
        _quantize_x_kernel[grid](
            x, xq, dx, xs, n_blocks, BLOCKS=_QUANTIZE_BLOCKS, num_warps=4, **pdl_launch(x.device)
        )
    if x.dim() == 1:
        return xq, dx, xs
    return xq.view(rows, k), dx.view(rows, -1), xs.view(rows, -1)


def _largest_divisor(n: int, limit: int) -> int:
    """The largest power of two <= limit that divides n."""
    s = 1
    while s * 2 <= limit and n % (s * 2) == 0:
        s *= 2
    return s


def uses_dp4a(
    parts: Sequence[PackedWeight], m: int = 1, dtype: torch.dtype = torch.bfloat16
) -> bool:
    """Whether m rows of x in `dtype` against these stacked parts take the dp4a kernels (these
    for the K-quants, gemv_blocks for Q8_0, Q5_0 and Q4_0): formats they all read, m at most
    DP4A_MAX_ROWS, and enough bytes that the kernel's gain pays for rounding x (one more launch
    where no op before rounds it; benchmarks/gpu_gemv.py, H100: gains of 5-25% from about 8 MB,
    a loss below; on an H200 Gemma 3 270M's 0.7-1.1 MB matrices gain nothing either at one row).
    The same rule at every m: a row's path, so its bits, must not depend on how many rows share
    the step (a decode step padded for its CUDA graph gives the unpadded logits).

    f32 rows (the output head's x, kept in f32 for the logits) take them up to
    DP4A_F32_MAX_ROWS, DP4A_MAX_ROWS a pass: the float paths multiply f32 x at full precision.
    In the profile of benchmarks/records/bench-2026-12-04-3c3ca51.json (H200) the 8B's
    128256-row Q6_K head took 2.17 ms a step at 32 and at 64 rows (~205 GB/s; 2.9 ms at 8 rows
    before this path) and 0.41 ms a pass of 8 rows on dp4a, so passes win up to about 40 rows;
    Gemma 3's Q8_0 head took 0.64-0.73 ms, against 59 us a pass."""
    limit = DP4A_F32_MAX_ROWS if dtype == torch.float32 else DP4A_MAX_ROWS
    return (
        1 <= m <= limit
        and all(p.ggml_type in DP4A_TYPES for p in parts)
        and sum(p.nbytes for p in parts) >= DP4A_MIN_BYTES
    )


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a product is cut up: `rows` per program, `sbs` super-blocks per loop step, `splits`
    programs along K (partial sums in an f32 scratch, added by one more kernel), `warps` per
    program; `kernel` is "owner" (each thread owns whole super-blocks of its rows), "staged"
    (Q4_K: the same, its quants loaded contiguously and passed on through shared memory; Q6_K
    takes "owner"), "tile" (the earlier kernels: threads share a super-block's words;
    `stages` pipelines them) or "cuda" (one row of x: kernels/cuda_gemv.py, `rows` rows a
    block of `warps` warps splitting K; `sbs` and `splits` do not apply)."""

    rows: int
    sbs: int
    splits: int = 1
    warps: int = 4
    kernel: str = "owner"
    stages: int = 1
    hoist: bool = True  # owner kernels: all quant loads issued before any arithmetic


def default_geometry(qtype: GGMLQuantizationType, n: int, k: int, m: int = 1) -> Geometry:
    """The winners of benchmarks/gpu_gemv.py's sweep on an H200 (Triton 3.6; µs, % of copy
    bandwidth). Q4_K, staged: 8 rows of 16 super-blocks for N <= 8192 (4096 x 4096: 6.2, 36%;
    the tile kernel 8.1), 16 rows from there (14336 x 4096: 13.7, 57%; tile 19.4); wide K in
    steps and splits of 8 super-blocks (4096 x 14336: 18.1, 43%; tile 20.9). Q6_K, owner: 8 rows
    of 16 super-blocks (1024 x 4096: 4.4, as the tile kernel), the output head 16 rows of 8 in
    two splits (146, 70%; tile 176). At wide K the tile kernel was a little faster (24.8, 46%;
    owner 25.5) but takes one row of x, and a row must sum in the same order alone or among
    others (gemv): the owner kernel in Q4_K's steps and splits.

    For m rows of x the steps and splits stay (they fix a row's order of summation); from 5
    rows each thread owns one (row, super-block) pair, twice the warps where it owned two: the
    staged kernel's 8 rows of x on two pairs spill (benchmarks/sass.py --rows)."""
    n_sb = k // 256
    wide_splits = n_sb // 8 if n_sb % 8 == 0 else 1
    if qtype == T.Q6_K:
        if n_sb > 16:
            g = Geometry(16, 8, wide_splits)
        else:
            g = Geometry(16, 8, 2) if n >= 32768 else Geometry(8, 16)
    elif n_sb > 16:
        g = Geometry(16, 8, wide_splits, kernel="staged")
    else:
        g = Geometry(8 if n <= 8192 else 16, 16, kernel="staged")
    if m > 4 and g.rows * g.sbs > 32 * g.warps:
        g = dataclasses.replace(g, warps=g.rows * g.sbs // 32)
    return g


def normalized(geometry: Geometry, k: int) -> Geometry:
    """`geometry` as it runs for a K: splits that divide K's super-blocks, and a step that
    divides a split."""
    n_sb = k // 256
    splits = max(1, min(geometry.splits, n_sb))
    while n_sb % splits:
        splits -= 1
    sbs = _largest_divisor(n_sb // splits, geometry.sbs)
    return dataclasses.replace(geometry, splits=splits, sbs=sbs)


def gemv(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weight: PackedWeight,
    out: torch.Tensor,
    geometry: Geometry | None = None,
) -> torch.Tensor:
    """out [M, N] (contiguous along N) = x W^T for M <= DP4A_MAX_ROWS rows of x given by
    quantize_x, cut up by `geometry` (by default `default_geometry`'s). Each row's result is
    the same bits whatever M is."""
    return _launch(xq, (weight,), out, geometry)


def gemv_parts(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    parts: Sequence[PackedWeight],
    out: torch.Tensor,
    geometry: Geometry | None = None,
) -> torch.Tensor:
    """out [M, sum of N] = M rows of x times the stacked parts, each part's columns in turn. Two
    Q4_K parts of one K (gate and up) take one launch of the owner kernel where the first part's
    rows fill whole programs; Q8_0, Q5_0 and Q4_0 parts take gemv_blocks' kernel. More than
    DP4A_MAX_ROWS rows go DP4A_MAX_ROWS at a time (f32 rows, see uses_dp4a)."""
    from metallic.kernels.gemv_blocks import BLOCK_TYPES, block_gemv  # it imports this module

    m = out.shape[0]
    if m > DP4A_MAX_ROWS:  # DP4A_MAX_ROWS rows a pass, each row's bits as alone
        for top in range(0, m, DP4A_MAX_ROWS):
            rows = slice(top, min(m, top + DP4A_MAX_ROWS))
            gemv_parts(tuple(t.reshape(m, -1)[rows] for t in xq), parts, out[rows], geometry)
        return out
    first = 0
    i = 0
    while i < len(parts):
        if parts[i].ggml_type in BLOCK_TYPES:
            block_gemv(xq, parts[i], out[:, first : first + parts[i].n])
            first += parts[i].n
            i += 1
            continue
        group = tuple(parts[i : i + 2])
        n = sum(p.n for p in group)
        g = geometry or default_geometry(group[0].ggml_type, n, group[0].k, out.shape[0])
        pair = (
            len(group) == 2
            and all(p.ggml_type == T.Q4_K and p.k == group[0].k for p in group)
            and group[0].n % g.rows == 0
            and g.kernel != "tile"
        )
        group = group if pair else group[:1]
        n = sum(p.n for p in group)
        _launch(xq, group, out[:, first : first + n], geometry)
        first += n
        i += len(group)
    return out


def _launch(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    parts: tuple[PackedWeight, ...],
    out: torch.Tensor,
    geometry: Geometry | None,
) -> torch.Tensor:
    """out [M, N] = M rows of x times one part, or two Q4_K parts stacked (see gemv_parts)."""
    q, dx, xs = xq
    weight = parts[0]
    m, n, k = out.shape[0], sum(p.n for p in parts), weight.k
    if not 1 <= m <= DP4A_MAX_ROWS or q.numel() != m * k or out.shape[1] != n:
        raise ValueError(
            f"gemv: out {list(out.shape)} and x of {q.numel()} quants do not fit M <= "
            f"{DP4A_MAX_ROWS} rows of K = {k} times N = {n}"
        )
    if geometry is None and cuda_gemv.enabled() and cuda_gemv.takes(xq, parts, m):
        return cuda_gemv.gemv(xq, parts, out)
    g = normalized(geometry or default_geometry(weight.ggml_type, n, k, m), k)
    if g.kernel == "cuda":
        return cuda_gemv.gemv(xq, parts, out, g.rows, g.warps)
    if g.kernel == "tile" and m > 1:
        raise ValueError("gemv: the tile kernels take one row of x")
    n_sb, splits, sbs = k // 256, g.splits, g.sbs
    per_split = n_sb // splits
    target = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n, g.rows), splits)
    words = q.view(torch.int32)
    common = dict(BN=g.rows, S=sbs, PARTIAL=splits > 1, ASM=not interpreting(), num_warps=g.warps)
    common |= pdl_launch(q.device)
    if g.kernel == "tile":
        common["STAGES"] = g.stages
    else:
        common |= dict(M=m, HOIST=g.hoist, PREFETCH=prefetch_enabled(q.device))
    if weight.ggml_type == T.Q4_K:
        blocks, halves = weight.planes
        if g.kernel == "tile":
            _gemv_q4_k_kernel[grid](
                blocks, halves, words, dx, xs, target, n, n_sb * 36, per_split, **common
            )
        else:
            second = parts[-1].planes[0]
            _gemv_q4_k_owner_kernel[grid](
                blocks, second, words, dx, xs, target, n, weight.n if len(parts) > 1 else n,
                n_sb, per_split, out.stride(0), STAGED=g.kernel == "staged", **common,
            )  # fmt: skip
    elif weight.ggml_type == T.Q6_K:
        ql, qh, scales, d = weight.planes
        if g.kernel == "tile":
            _gemv_q6_k_kernel[grid](ql, qh, scales, d, words, dx, xs, target, n, n_sb, per_split,
                                    **common)  # fmt: skip
        else:
            _gemv_q6_k_owner_kernel[grid](
                ql, qh, scales.view(torch.int32), d, words, dx, xs, target, n, n_sb, per_split,
                out.stride(0), **common,
            )  # fmt: skip
    else:
        raise ValueError(f"no dp4a kernel for {weight.ggml_type.name}")
    if splits > 1:
        sum_splits(target, out)
    return out
