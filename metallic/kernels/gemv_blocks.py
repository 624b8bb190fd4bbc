"""Decode products (1 to 8 rows of x) against the 32-element block formats Q8_0, Q5_0 and Q4_0
with 8-bit integer dot products.

Gemma 3's small widths (640 is no multiple of 256) keep most of its matrices, the 262144-row
output head among them, in these formats. The float kernel (quant_matmul) converts every weight
to f32 and multiplies it once per row of x, so several rows make it instruction-bound. Here, as in
quant_gemv for the K-quants, x is rounded to int8 blocks of 32 with an f32 scale (quantize_x;
the blocks line up with the weights' blocks) and ``dp4a`` multiplies four weight bytes by four x
bytes. A weight word is decoded to four signed bytes once and multiplied by every row of x:

    sum_l d*w_l * dx*xq_l = d * dx * sum_l w_l*xq_l      (one f32 scale pair per block)

- Q8_0: w = q, the stored signed bytes as they are.
- Q4_0: w = q - 8 with q the unsigned nibble (elements 0-15 of a block in the low nibbles of its
  16 bytes, 16-31 in the high ones). The dot starts at -8 times the x block's sum of quants,
  an exact integer shared by all of a thread's rows.
- Q5_0: w = q - 16 with q = nibble | bit 4, bit 4 of element e being bit e of the block's
  32-bit qh. w is made a signed byte directly: the nibble, and above it four copies of the
  inverted high bit (w = nibble - 16 when the bit is clear). A multiply moves four bits of qh to
  the top of four bytes and one ``prmt`` copies each byte's top bit across it.

Each thread owns whole (row, block) pairs of a [blocks, rows] tile, so a block's quants arrive
in 16-byte loads and the thread's x words serve all its rows (four at the output head's
geometry). The lanes of a warp run along a row's blocks first, so a load touches a few
neighbouring lines, not 32 rows (lanes along rows, the head took 1.5-2x as long).

Each row of x has its own accumulator and the same instructions whatever the number of rows:
with one geometry a row's result is bitwise the same alone or among up to 7 others (batch
invariance); the geometry depends on the matrix's shape only. The weight's decode is shared
by all rows of x, so its cost per weight falls as M grows while the dp4a count grows with M.

Under TRITON_INTERPRET=1 (no PTX) dp4a and prmt are emulated; integer arithmetic is exact, so
emulation and instruction give identical sums.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels.packing import PackedWeight
from metallic.kernels.pdl import pdl_launch, wait_for_inputs
from metallic.kernels.quant_gemv import _dp4a, _largest_divisor, _rows, _words
from metallic.kernels.quant_matmul import interpreting, sum_splits
from metallic.kernels.rounding import X_BLOCK

T = GGMLQuantizationType

BLOCK_TYPES = (T.Q8_0, T.Q5_0, T.Q4_0)
MAX_M = 8  # rows of x one launch takes (one accumulator each)
_FORMAT_IDS = {T.Q8_0: 0, T.Q5_0: 1, T.Q4_0: 2}
_HIGH_NIBBLES = tl.constexpr(-0x0F0F0F10)  # 0xF0F0F0F0 as a signed 32-bit word


# fmt: off
@triton.jit
def _byte_signs(word, ASM: tl.constexpr):
    """Each byte of word as 0xFF where its top bit is set, else 0: one prmt in sign mode."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, 0, 0xBA98;", "=r,r", [word],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return ((word >> 7) & 0x01010101) * 0xFF


@triton.jit
def _q5_0_word(nibbles, qh, HIGH: tl.constexpr, ASM: tl.constexpr):
    """Four Q5_0 weights q - 16 as signed bytes: nibbles' low nibbles, and as their high bits
    bits 0-3 (or with HIGH bits 4-7) of qh."""
    # Bit j of the four lands on bit 8j + 7; the products of the four bits never overlap.
    tops = (qh & 0xF0) * 0x01020408 if HIGH else (qh & 0x0F) * 0x10204080
    return (nibbles & 0x0F0F0F0F) | (~_byte_signs(tops, ASM) & _HIGH_NIBBLES)


@triton.jit
def _weights(qs_ptr, qh_ptr, at, FMT: tl.constexpr, A0: tl.constexpr, A1: tl.constexpr,
             ASM: tl.constexpr):
    """The eight words of signed weight bytes of blocks `at` [A0, A1], word i holding elements
    4i..4i+3 of the block (x's word order), as a tuple of [A0, A1] tensors."""
    quad = tl.arange(0, 4)[None, None, :]
    if FMT == 0:  # Q8_0: eight words of signed bytes
        a0, a1, a2, a3 = _words(tl.load(qs_ptr + at[:, :, None] * 8 + quad), A0, A1)
        b0, b1, b2, b3 = _words(tl.load(qs_ptr + at[:, :, None] * 8 + 4 + quad), A0, A1)
        return a0, a1, a2, a3, b0, b1, b2, b3
    else:  # Q5_0, Q4_0: byte b of word w has element 4w + b (low nibble), 16 + 4w + b (high)
        w0, w1, w2, w3 = _words(tl.load(qs_ptr + at[:, :, None] * 4 + quad), A0, A1)
        if FMT == 2:
            return (w0 & 0x0F0F0F0F, w1 & 0x0F0F0F0F, w2 & 0x0F0F0F0F, w3 & 0x0F0F0F0F,
                    (w0 >> 4) & 0x0F0F0F0F, (w1 >> 4) & 0x0F0F0F0F, (w2 >> 4) & 0x0F0F0F0F,
                    (w3 >> 4) & 0x0F0F0F0F)
        else:  # bit e of qh is bit 4 of element e: byte k of qh serves words 2k and 2k + 1
            qh = tl.load(qh_ptr + at)
            h0 = qh
            h1 = qh >> 8
            h2 = qh >> 16
            h3 = qh >> 24
            return (_q5_0_word(w0, h0, False, ASM), _q5_0_word(w1, h0, True, ASM),
                    _q5_0_word(w2, h1, False, ASM), _q5_0_word(w3, h1, True, ASM),
                    _q5_0_word(w0 >> 4, h2, False, ASM), _q5_0_word(w1 >> 4, h2, True, ASM),
                    _q5_0_word(w2 >> 4, h3, False, ASM), _q5_0_word(w3 >> 4, h3, True, ASM))


@triton.jit
def _block_gemv_kernel(qs_ptr, qh_ptr, d_ptr, xq_ptr, dx_ptr, xs_ptr, out_ptr, N, nb,
                       stride_om, blocks_per_split, FMT: tl.constexpr, M: tl.constexpr,
                       BN: tl.constexpr, S: tl.constexpr, BLOCKS_FIRST: tl.constexpr,
                       PARTIAL: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """out[m, rows] for every row m < M of x, over blocks [pid1 * blocks_per_split, +that), S
    at a time; FMT 0, 1, 2 is Q8_0, Q5_0, Q4_0.

    Row m of x is block m * nb + b of quantize_x's output (rows stacked along K); its
    accumulator takes the same instructions whatever M is. Tiles are [BN rows, S blocks], or
    with BLOCKS_FIRST [S, BN]: Triton's lanes then run along the blocks of a row first, so a
    warp's 16-byte loads stay in a few lines and a thread's rows share one block of x.
    """
    wait_for_inputs(PDL)
    ids, rows = _rows(BN, N)
    A0: tl.constexpr = S if BLOCKS_FIRST else BN
    A1: tl.constexpr = BN if BLOCKS_FIRST else S
    accs = ()
    for _ in tl.static_range(M):  # (Triton's frontend takes no starred tuples)
        accs = accs + (tl.zeros((A0, A1), dtype=tl.float32),)  # noqa: RUF005
    first = tl.program_id(1) * blocks_per_split
    quad = tl.arange(0, 4)[None, :]
    for s in tl.range(first, first + blocks_per_split, S):
        blocks = s + tl.arange(0, S)
        if BLOCKS_FIRST:
            at = blocks[:, None] + rows[None, :] * nb
        else:
            at = rows[:, None] * nb + blocks[None, :]
        w = _weights(qs_ptr, qh_ptr, at, FMT, A0, A1, ASM)
        d = tl.load(d_ptr + at).to(tl.float32)
        updated = ()
        for m in tl.static_range(M):
            xb = m * nb + blocks  # [S]
            xw = xq_ptr + xb[:, None] * 8 + quad  # [S, 4]
            if BLOCKS_FIRST:
                x0, x1, x2, x3 = _words(tl.load(xw)[:, None, :], S, 1)
                x4, x5, x6, x7 = _words(tl.load(xw + 4)[:, None, :], S, 1)
            else:
                x0, x1, x2, x3 = _words(tl.load(xw)[None, :, :], 1, S)
                x4, x5, x6, x7 = _words(tl.load(xw + 4)[None, :, :], 1, S)
            if FMT == 2:  # sum of (q - 8) * x = dot - 8 * (the block's sum of x quants)
                xs = tl.load(xs_ptr + 2 * xb) + tl.load(xs_ptr + 2 * xb + 1)
                start = (-8.0 * xs).to(tl.int32)
            else:
                start = tl.zeros((S,), dtype=tl.int32)
            dx = tl.load(dx_ptr + xb)
            if BLOCKS_FIRST:
                dot, dx = start[:, None], dx[:, None]
            else:
                dot, dx = start[None, :], dx[None, :]
            dot = _dp4a(w[0], x0, dot, ASM)
            dot = _dp4a(w[1], x1, dot, ASM)
            dot = _dp4a(w[2], x2, dot, ASM)
            dot = _dp4a(w[3], x3, dot, ASM)
            dot = _dp4a(w[4], x4, dot, ASM)
            dot = _dp4a(w[5], x5, dot, ASM)
            dot = _dp4a(w[6], x6, dot, ASM)
            dot = _dp4a(w[7], x7, dot, ASM)
            updated = updated + (accs[m] + d * (dx * dot.to(tl.float32)),)  # noqa: RUF005
        accs = updated
    ok = ids < N
    for m in tl.static_range(M):
        total = tl.sum(accs[m], axis=0 if BLOCKS_FIRST else 1)
        if PARTIAL:  # this split's [M, N] slice of the f32 scratch
            tl.store(out_ptr + (tl.program_id(1) * M + m) * N + ids, total, mask=ok)
        else:
            tl.store(out_ptr + m * stride_om + ids, total.to(out_ptr.dtype.element_ty), mask=ok)

# fmt: on


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a product is cut up: `rows` of the matrix per program, `blocks` of 32 per loop step
    (a power of two), `splits` programs along K (partial sums added by one more kernel),
    `warps` per program. With `blocks_first` (tiles [blocks, rows]) a warp's lanes take
    `blocks` neighbouring blocks of 32 / blocks rows, and a thread owns rows / (32 / blocks *
    warps) rows of one block per step; without, lanes run along rows (the sweep's comparison).
    """

    rows: int
    blocks: int
    splits: int = 1
    warps: int = 4
    blocks_first: bool = True  # tiles [blocks, rows]: lanes along a row's blocks first


def default_geometry(n: int, k: int) -> Geometry:
    """The geometry for an [n, k] matrix of any of the three formats; never depends on M, so a
    row of x gets the same bits alone or in a batch. benchmarks/gpu_gemv_blocks.py's sweep on
    an H200 (Triton 3.6; µs at M = 1 / 8, K = 640): the 262144-row output head takes 64 rows of
    4 blocks on 2 warps (45.6 / 59.1; 92% / 71% of copy bandwidth; 256 rows on 4 warps 55.9 /
    54.1), matrices of 2048-8191 rows 32 rows on 4 warps with K in up to five splits (Q5_0 4096
    x 640: 3.1 / 4.6; unsplit 2.4 / 6.2), smaller ones 8 rows on one warp in splits (Q5_0 1024
    x 640: 2.6 / 3.4; 32 rows unsplit 2.3 / 5.8). Splits keep steps of 4 blocks."""
    nb = k // X_BLOCK
    if n >= 16384:
        return Geometry(64, 4, 1, 2)
    splits = max(s for s in range(1, 6) if nb % (4 * s) == 0) if nb % 4 == 0 else 1
    if n >= 8192:
        return Geometry(32, 4, 1, 4)
    if n >= 2048:
        return Geometry(32, 4, splits, 4)
    return Geometry(8, 4, splits, 1)


def normalized(geometry: Geometry, k: int) -> Geometry:
    """`geometry` as it runs for a K: splits that divide K's blocks, a step that divides a
    split, and a tile that keeps every thread busy."""
    nb = k // X_BLOCK
    splits = max(1, min(geometry.splits, nb))
    while nb % splits:
        splits -= 1
    blocks = _largest_divisor(nb // splits, min(geometry.blocks, 32))
    rows = max(geometry.rows, 32 * geometry.warps // blocks)
    return dataclasses.replace(geometry, rows=rows, blocks=blocks, splits=splits)


def block_gemv(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weight: PackedWeight,
    out: torch.Tensor,
    geometry: Geometry | None = None,
) -> torch.Tensor:
    """out [M, N] = x W^T for M = out.shape[0] (1 to 8) rows of x [M, K], given rounded as
    ``quantize_x(x.reshape(-1))`` (rows stacked along K). out's rows must be contiguous; it
    may be a column slice of a wider output. `geometry` defaults to `default_geometry`."""
    if weight.ggml_type not in _FORMAT_IDS:
        raise MetallicError(
            f"block_gemv multiplies Q8_0, Q5_0 or Q4_0, not {weight.ggml_type.name}"
        )
    q, dx, xs = xq
    m, n, k = out.shape[0], weight.n, weight.k
    if out.dim() != 2 or out.shape[1] != n or out.stride(1) != 1:
        raise MetallicError(
            f"out must be [M, {n}] with contiguous rows, got {list(out.shape)} {out.stride()}"
        )
    if not 1 <= m <= MAX_M or q.numel() != m * k:
        raise MetallicError(
            f"block_gemv takes 1 to {MAX_M} rows of x [M, {k}], got {q.numel()} quants for "
            f"{m} output rows"
        )
    g = normalized(geometry or default_geometry(n, k), k)
    nb = k // X_BLOCK
    per_split = nb // g.splits
    target = out
    if g.splits > 1:
        target = torch.empty(g.splits, m, n, dtype=torch.float32, device=out.device)
    planes = weight.planes
    qh = planes[1] if weight.ggml_type == T.Q5_0 else planes[0]
    _block_gemv_kernel[(triton.cdiv(n, g.rows), g.splits)](
        planes[0], qh, planes[-1], q.view(torch.int32), dx, xs, target, n, nb, out.stride(0),
        per_split, FMT=_FORMAT_IDS[weight.ggml_type], M=m, BN=g.rows, S=g.blocks,
        BLOCKS_FIRST=g.blocks_first, PARTIAL=g.splits > 1, ASM=not interpreting(),
        num_warps=g.warps, **pdl_launch(out.device),
    )  # fmt: skip
    if g.splits > 1:
        sum_splits(target, out)
    return out
