"""Decode products (one row of x) against K-quant weights with 8-bit integer dot products.

At one row of x a quantized matmul reads each weight once and does one multiply-add with it, so
its cost is the instructions that turn a weight's bits into that multiply-add. The float path
(quant_matmul's FMA mode) unpacks, converts and multiplies every weight in f32; here x is
rounded once per product to signed 8-bit integers with one f32 scale per 32 elements (as
llama.cpp's GPU backend does with its q8_1 blocks), the weights' quants stay integers, and
``dp4a`` multiplies four quant bytes by four x bytes and adds them in one instruction: a 32-bit
word of Q4_K quants (eight weights) takes two masks, a shift and two dp4a. Compiled for sm_90
with addressing, scales and reductions, the kernel runs about 2.6 instructions per weight. The
float scales are applied once per 16 or 32-element sub-block:

    sum_l (d*sc*q_l - dmin*m) * dx*xq_l = dx * (d*sc * sum_l q_l*xq_l - dmin*m * sum_l xq_l)

Under TRITON_INTERPRET=1 (no PTX) ``dp4a`` is emulated with shifts and multiplies; integer
arithmetic is exact, so the emulation and the instruction give identical sums.

Layouts are metallic.kernels.packing's: Q4_K in place (36 words a block), Q6_K in planes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from metallic.kernels.packing import PackedWeight
from metallic.kernels.quant_matmul import interpreting, sm_count, sum_splits

T = GGMLQuantizationType

GEMV_TYPES = (T.Q4_K, T.Q6_K)
DP4A_MIN_BYTES = 8 << 20  # below this a one-row product keeps the float kernel (uses_dp4a)
_X_BLOCK = 32  # elements of x per f32 scale
_QUANTIZE_BLOCKS = 32  # x blocks per program of the rounding kernel


# fmt: off
@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + the dot product of a's and b's four signed bytes."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for k in tl.static_range(4):
            c += ((a << (24 - 8 * k)) >> 24) * ((b << (24 - 8 * k)) >> 24)
        return c


@triton.jit
def _quantize_x_kernel(x_ptr, xq_ptr, dx_ptr, xs_ptr, n_blocks, BLOCKS: tl.constexpr):
    """Blocks of 32 elements of x: int8 quants, their f32 scale and each half's sum of quants."""
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    ok = b < n_blocks
    e = tl.arange(0, 32)
    x = tl.load(x_ptr + b[:, None] * 32 + e[None, :], mask=ok[:, None], other=0.0)
    store_rounded_blocks(x.to(tl.float32), b, ok, xq_ptr, dx_ptr, xs_ptr)


@triton.jit
def store_rounded_blocks(x, b, ok, xq_ptr, dx_ptr, xs_ptr):
    """Rows of x [B, 32] (f32), blocks b of x that exist where ok: their int8 quants, f32 scale
    and each half's sum of quants, as quantize_x lays them out (the norm kernel stores a decode
    row's blocks this way too, so its product needs no rounding launch)."""
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    v = x * inv[:, None]
    q = tl.where(v < 0, -tl.floor(0.5 - v), tl.floor(v + 0.5))
    e = tl.arange(0, 32)
    tl.store(xq_ptr + b[:, None] * 32 + e[None, :], q.to(tl.int8), mask=ok[:, None])
    tl.store(dx_ptr + b, amax / 127.0, mask=ok)
    halves = tl.sum(tl.reshape(q, (x.shape[0], 2, 16)), axis=2)
    h = tl.arange(0, 2)
    tl.store(xs_ptr + 2 * b[:, None] + h[None, :], halves, mask=ok[:, None])


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
                      ASM: tl.constexpr, STAGES: tl.constexpr):
    """out[rows] over super-blocks [pid1 * sb_per_split, +sb_per_split), S at a time.

    Tiles are [BN rows, S super-blocks, 4 chunks j, 8 words w]: byte b of quant word w of chunk
    j holds elements 64j + 4w + b (low nibble, sub-block 2j) and 64j + 32 + 4w + b (high
    nibble, sub-block 2j + 1); x's int8 word 16j + w (+ 8) holds the same elements of x.
    """
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
def _gemv_q6_k_kernel(ql_ptr, qh_ptr, sc_ptr, d_ptr, xq_ptr, dx_ptr, xs_ptr, out_ptr, N, n_sb,
                      sb_per_split, BN: tl.constexpr, S: tl.constexpr, PARTIAL: tl.constexpr,
                      ASM: tl.constexpr, STAGES: tl.constexpr):
    """out[rows] over super-blocks [pid1 * sb_per_split, +sb_per_split), S at a time.

    Tiles are [BN rows, S super-blocks, 2 halves h, 2 sixteens i, 4 words t]; a = 4i + t. Byte b
    of low word a (of half h's 16 words) and of its high word a hold element 128h + 4a + b (low
    nibble, high bits 0-1), 128h + 64 + 4a + b (high nibble, bits 4-5); low word 8 + a holds
    128h + 32 + 4a + b and 128h + 96 + 4a + b (high bits 2-3 and 6-7). Element group c (of
    32, 128h + 32c..) takes scale 8h + 2c + i; the stored quant is q + 32.
    """
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
# fmt: on


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] (K a multiple of 32) as int8 quants [K], f32 scales [K/32] and f32 sums of each
    16 quants [K/16]: what every dp4a product against it reads."""
    if x.dim() != 1 or x.shape[0] % _X_BLOCK:
        raise ValueError(f"quantize_x: x must be [K] with K a multiple of 32, got {list(x.shape)}")
    x = x.contiguous()
    n_blocks = x.shape[-1] // _X_BLOCK
    xq, dx, xs = empty_quantized_x(x.shape[-1], x.device)
    grid = (triton.cdiv(n_blocks, _QUANTIZE_BLOCKS),)
    _quantize_x_kernel[grid](x, xq, dx, xs, n_blocks, BLOCKS=_QUANTIZE_BLOCKS, num_warps=4)
    return xq, dx, xs


def empty_quantized_x(k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Buffers for x [K] rounded as quantize_x returns it: quants, scales, half-block sums."""
    n_blocks = k // _X_BLOCK
    return (
        torch.empty(k, dtype=torch.int8, device=device),
        torch.empty(n_blocks, dtype=torch.float32, device=device),
        torch.empty(2 * n_blocks, dtype=torch.float32, device=device),
    )


def _largest_divisor(n: int, limit: int) -> int:
    """The largest power of two <= limit that divides n."""
    s = 1
    while s * 2 <= limit and n % (s * 2) == 0:
        s *= 2
    return s


def uses_dp4a(parts: Sequence[PackedWeight]) -> bool:
    """Whether a one-row product against these stacked parts should take the dp4a kernels: all
    K-quants they have, and enough bytes that the kernel's gain pays for rounding x (one more
    launch; benchmarks/gpu_gemv.py, H100: gains of 5-25% from about 8 MB, a loss below)."""
    return (
        all(p.ggml_type in GEMV_TYPES for p in parts)
        and sum(p.nbytes for p in parts) >= DP4A_MIN_BYTES
    )


def _geometry(weight: PackedWeight, sms: int) -> tuple[int, int, int, int]:
    """(rows per program, super-blocks per step, K splits, warps): the winners of
    benchmarks/gpu_gemv.py's sweep on an H100 at Llama-3-8B shapes (other choices measured up
    to 1.3x slower, and untried large tiles can be far worse). K of 4096: 8 rows with the whole
    row (16 super-blocks) in flight, 4 warps; the tall output head and wide K: 8 super-blocks a
    step, 16 or 32 rows, 8 warps, Q4_K's wide K split in two. Rows halve while the grid has
    fewer programs than multiprocessors."""
    wide = weight.k > 16 * 256
    tall = weight.n >= 32768
    sbs = 8 if wide or tall else 16
    rows = 8
    if wide:
        rows = 32 if weight.ggml_type == T.Q4_K else 16
    elif tall:
        rows = 16
    splits = 2 if wide and weight.ggml_type == T.Q4_K else 1
    while rows > 4 and triton.cdiv(weight.n, rows) * splits < sms:
        rows //= 2
    return rows, sbs, splits, 8 if wide or tall else 4


def gemv(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weight: PackedWeight,
    out: torch.Tensor,
    *,
    rows: int | None = None,
    sbs: int = 16,
    splits: int = 1,
    num_warps: int = 4,
    stages: int = 1,
) -> torch.Tensor:
    """out [1, N] (contiguous along N) = x W^T for x given by quantize_x.

    `rows` per program, `sbs` super-blocks per loop step, `splits` programs along K (partial sums
    in an f32 scratch, added by one more kernel), `num_warps` and pipeline `stages`; without
    `rows`, all come from measured defaults."""
    q, dx, xs = xq
    n, k = weight.n, weight.k
    if rows is None:
        rows, sbs, splits, num_warps = _geometry(weight, sm_count(q.device))
    n_sb = k // 256
    splits = max(1, min(splits, n_sb))
    while n_sb % splits:
        splits -= 1
    per_split = n_sb // splits
    sbs = _largest_divisor(per_split, sbs)
    target = out if splits == 1 else torch.empty(splits, n, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n, rows), splits)
    words = q.view(torch.int32)
    asm = not interpreting()
    if weight.ggml_type == T.Q4_K:
        blocks, halves = weight.planes
        _gemv_q4_k_kernel[grid](
            blocks, halves, words, dx, xs, target, n, n_sb * 36, per_split,
            BN=rows, S=sbs, PARTIAL=splits > 1, ASM=asm, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    elif weight.ggml_type == T.Q6_K:
        ql, qh, scales, d = weight.planes
        _gemv_q6_k_kernel[grid](
            ql, qh, scales, d, words, dx, xs, target, n, n_sb, per_split,
            BN=rows, S=sbs, PARTIAL=splits > 1, ASM=asm, STAGES=stages, num_warps=num_warps,
        )  # fmt: skip
    else:
        raise ValueError(f"no dp4a kernel for {weight.ggml_type.name}")
    if splits > 1:
        sum_splits(target, out)
    return out
