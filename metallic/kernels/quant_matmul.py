"""Matrix products against ggml-quantized weights, dequantizing in registers (Triton).

One kernel reads every format (layouts: metallic.kernels.packing). It walks K in steps of one or
more 256-element super-blocks (a K-quant super-block, or eight 32-element blocks), each step in
sub-tiles of words [rows, groups, 2]: one 8-byte load per thread and row. In every format the
bytes of a word are four consecutive elements of K (for the nibble formats twice: low nibbles,
then high nibbles PAR_STRIDE further on), so a word gives planes ``f[par][k]``; all elements of a
group share one scale per ``par``, which broadcasts for free.

A quant becomes a float without integer conversion: its bits go to the top of the mantissa of 1.0
(``0x3F800000 | q << (23 - bits)`` read as f32 is ``1 + q / 2**bits``): a shift and a mask.

Three modes share the step code:

- FMA (M = 1): per step and scale, ``p += x * f`` and ``xs += x``, then ``acc += a*p - b*xs``
  where ``w = a*f - b`` is the weight: one FMA per weight in the loop. x comes as 8-byte packs of
  the 4 elements a word's bytes hold, so its loads take the weights' layout. A warp spans 32
  groups of one row (about 1 KB of contiguous bytes per row and step).
- DOT (M >= 2): ``w = a*f - b`` per element; each par's planes are joined into a
  [rows, 8*groups] tile of 8-element runs of K, one ``tl.dot`` (the tensor cores) with a tile of
  x^T: a program takes a tile of rows of W and one of M (padded), so each weight is read and
  dequantized once per tile of M. Tiles by M and format: _DOT_TILES.
- DEQUANT: the weights with the reference's float operations in its order, so the result is
  bit-exact (the launch turns FMA contraction off), stored in 16-byte runs: embedding lookups,
  and ops.linear's products of more than MAX_FUSED_M rows (with torch.matmul).

Products split K across programs when N (and M) alone give too few programs to keep every SM
streaming; partial sums go to an f32 scratch and one more small kernel adds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels.activation import ACTIVATION_KINDS, gated_value
from metallic.kernels.packing import PackedWeight, check_shape, prepare_weight
from metallic.kernels.pdl import pdl_launch, prefetch_enabled, prefetch_l2, wait_for_inputs

T = GGMLQuantizationType

STEP = 256  # elements of K in a super-block: steps are whole numbers of them
_ONE_BITS = 0x3F800000  # 1.0f: kernels get it as an argument (see _unit)
# Rows of x up to which a product runs the fused kernel; above, ops.linear dequantizes into a
# scratch matrix and calls cuBLAS. Measured on an H200 (benchmarks/gpu_batched_matmul.py,
# BENCHMARKS.md): up to 16 rows the fused kernel wins on every shape; from 17 to 128 rows it wins
# on matrices of FUSED_MIN_BYTES or more (the 8B's: 0.36-0.75x of dequantize + cuBLAS at 32-128
# rows) and loses on small ones (Gemma 3 270M's 640-wide layers: 1.3-4.8x), whose grids are too
# small to fill the GPU; at 512 rows dequantize + cuBLAS wins everywhere (1.6-2.3x).
MAX_SMALL_FUSED_M = 16
MAX_FUSED_M = 128
FUSED_MIN_BYTES = 4 << 20


def fuses(m: int, n_bytes: int, dtype: torch.dtype) -> bool:
    """Whether m rows of x in `dtype` against a matrix of n_bytes take the fused kernel (see
    above). f32 rows (the output matrix's) fuse only up to 16: the tiles were measured with
    16-bit x, and in the engine 64 f32 rows against Gemma's output took ~5 ms, 20x the bf16
    time, against ~0.4 ms through dequantize + cuBLAS."""
    if m <= MAX_SMALL_FUSED_M:
        return True
    wide = dtype in (torch.float16, torch.bfloat16)
    return wide and m <= MAX_FUSED_M and n_bytes >= FUSED_MIN_BYTES


_MODE_FMA, _MODE_DOT, _MODE_DEQUANT = 0, 1, 2
_FMT_Q4_0, _FMT_Q5_0, _FMT_Q8_0, _FMT_Q4_K, _FMT_Q5_K, _FMT_Q6_K, _FMT_DENSE = range(7)
_FMT_IDS = {
    T.Q4_0: _FMT_Q4_0,
    T.Q5_0: _FMT_Q5_0,
    T.Q8_0: _FMT_Q8_0,
    T.Q4_K: _FMT_Q4_K,
    T.Q5_K: _FMT_Q5_K,
    T.Q6_K: _FMT_Q6_K,
    T.F16: _FMT_DENSE,
    T.BF16: _FMT_DENSE,
}
# Groups (threads along K, one scale set each) per 256 elements, by format.
_GROUPS = {
    _FMT_Q4_0: 8,
    _FMT_Q5_0: 8,
    _FMT_Q8_0: 8,
    _FMT_Q4_K: 4,
    _FMT_Q5_K: 4,
    _FMT_Q6_K: 8,
}
# Groups per step (measured on an H100, Llama-3-8B shapes): the FMA mode puts a warp's 32 threads
# across one row's K, about 1 KB of contiguous bytes per row and step (long DRAM bursts: 1.6x
# faster than 144 bytes).
_FMA_GROUPS = 32
_FMA_ROWS_PER_THREAD = 2  # x is loaded once for this many rows (4 was 1.6x slower: registers)
_DEQUANT_ROWS, _DENSE_ROWS = 16, 16
# DEQUANT: groups per step (0: one super-block) and warps. Swept on an H200 at 8B shapes
# (benchmarks/gpu_profile.py --sweep-dequant): 16 rows x 8 warps beat 32 x 4 by 1.25-1.5x.
_DEQUANT_GROUPS, _DEQUANT_WARPS = 0, 8
_PROGRAMS_PER_SM = 4  # FMA mode: split K until the grid has this many programs per multiprocessor
# Below this many weight bytes a decode product is launch-bound: no split-K, no merge launch.
_MIN_SPLIT_BYTES = 4 << 20
# Split K no further than f32 partial sums of this many bytes: written, then read back by the
# merge right away, they stay in the L2 (50 MB on an H100/H200) instead of adding DRAM traffic.
# At M = 64 the 8B's q|k|v takes 1.6 MB a split; a 512-row product of N = 4096, 8.4 MB.
_MAX_SCRATCH_BYTES = 16 << 20


@dataclass(frozen=True)
class DotTile:
    """The geometry of a DOT-mode launch (see _DOT_TILES)."""

    bm: int  # rows of x per program; M is padded up to a multiple of it
    bn: int  # rows of W per program
    groups: int  # groups per K step, as far as K allows; each tl.dot spans 8 * groups of K
    warps: int
    stages: int  # Triton's software pipelining depth (num_stages)
    programs_per_sm: int  # split K until the grid has this many programs per multiprocessor

    def __post_init__(self) -> None:
        powers = {"bm": 16, "bn": 16, "groups": 1, "warps": 1}  # tl.dot tiles are >= 16
        for name, least in powers.items():
            value = getattr(self, name)
            if value < least or value & (value - 1):
                raise MetallicError(f"DotTile.{name} must be a power of two >= {least}: {value}")
        if self.stages < 1 or self.programs_per_sm < 1:
            raise MetallicError(f"DotTile stages and programs_per_sm must be >= 1: {self}")


_BUCKET_TILES = {
    16: DotTile(bm=16, bn=64, groups=8, warps=4, stages=1, programs_per_sm=4),
    32: DotTile(bm=32, bn=128, groups=8, warps=8, stages=1, programs_per_sm=4),
    64: DotTile(bm=64, bn=128, groups=8, warps=8, stages=1, programs_per_sm=4),
    128: DotTile(bm=128, bn=128, groups=8, warps=8, stages=1, programs_per_sm=1),
}
# Q6_K (the 8B's ffn_down on half its layers, attn_v, the output head) needs 170-180 registers a
# thread at 32 and 64 rows of x: 8 warps of 128 rows of W fit once per SM (8 warps), 4 warps of
# 64 rows three times (12 warps).
_FORMAT_TILES = {
    (m, T.Q6_K): DotTile(bm=m, bn=64, groups=8, warps=4, stages=1, programs_per_sm=4)
    for m in (32, 64)
}
_DOT_TILES = {
    (m, qtype): _FORMAT_TILES.get((m, qtype), tile)
    for m, tile in _BUCKET_TILES.items()
    for qtype in _FMT_IDS
}
"""DOT-mode geometry by (M bucket, format): M takes the smallest bucket that holds it (decode
batches of 2..64 rows: one tile of M); beyond the largest, tiles of 128 rows (prefill).

Chosen from the sm_90 code, not yet from timings: ``python benchmarks/sm90_tiles.py`` compiles
every entry on the CPU (Triton 3.9's ptxas) and prints the figures below;
``benchmarks/gpu_batched_matmul.py --sweep`` times the alternatives on the GPU.

- Groups 8 (each tl.dot spans 64 of K; a step 256 or, for Q4_K/Q5_K, 512 elements): the
  measured best of the DOT mode at up to 16 rows (8 groups by 64 rows beat 16 by 32 by 1.4x).
- One stage: Triton's pipelining holds every sub-tile's words and x tile per stage in shared
  memory. With its default 3 stages 16 rows of x take 48-132 KB (Q4_K 100 KB: 2 programs per
  SM; Q5_K 132 KB: 1), 32 rows 72-180 KB, 64 rows 120-276 KB (Q4_K, Q5_K: more than an SM has,
  the launch fails). With one stage 8-32 KB, so registers set the occupancy (at 16 rows 12-36
  warps per SM against 4-16), and the quant formats' loop runs 10-18% fewer instructions.
- 128 rows of W by 8 warps at 32 and 64 rows of x: about the registers a thread of 64 rows by 4
  warps (Q4_0, Q4_K, Q8_0: 16 warps per SM, against 12-16), and half the traffic of x, which
  every program re-reads from L2 along all of K: at M = 64 with 64 rows of W, 3.6 bytes per
  byte of Q4_K weight, with 128 rows 1.8. Q6_K keeps 64 rows: see _FORMAT_TILES.
- Decode tiles split K until 4 programs per SM (as the FMA mode): the products are bound by
  memory, so every SM needs loads in flight. Prefill (128 x 128, 8 warps: 64 registers of
  accumulator a thread, 135-250 in all, one program per SM) is bound by compute: K is split only
  to fill SMs a grid leaves idle (_MAX_SCRATCH_BYTES keeps the 8B's 512-row products whole).
- Dequantizing costs 4.5-5 (Q4_0, Q8_0), 5-5.4 (Q4_K), 6.6-7.5 (Q5_0, Q5_K, Q6_K) instructions a
  weight and tile of M, whatever the tile: at 32-64 rows the issue slots that takes on an H200
  are about the time its bytes take to arrive. Fewer instructions are the next lever.
"""


def dot_tile(m: int, ggml_type: GGMLQuantizationType | int) -> DotTile:
    """The table's tile for a product of ``m`` rows of x (m >= 2) against ``ggml_type``."""
    bucket = next((b for b in sorted(_BUCKET_TILES) if m <= b), max(_BUCKET_TILES))
    return _DOT_TILES[(bucket, T(ggml_type))]


def _geometry(
    fmt: int, mode: int, k: int, tile: DotTile | None = None
) -> tuple[int, int, int, int]:
    """(super-blocks per step, groups, words per thread, rows per program) for a launch.

    Steps span as many super-blocks as the mode's group target asks, as far as K allows
    (DEQUANT's grid has one program per step and row block). The DOT mode takes its target and
    rows from ``tile``.
    """
    if fmt == _FMT_DENSE:
        return 1, 8, 32, tile.bn if mode == _MODE_DOT else _DENSE_ROWS
    if mode == _MODE_DOT:
        target = tile.groups
    else:
        target = _FMA_GROUPS if mode == _MODE_FMA else _DEQUANT_GROUPS
    sbs = 1
    while sbs * _GROUPS[fmt] < target and sbs * 2 * STEP <= k:
        sbs *= 2
    groups = sbs * _GROUPS[fmt]
    if mode == _MODE_FMA:
        rows = 128 * _FMA_ROWS_PER_THREAD // groups
    else:
        rows = tile.bn if mode == _MODE_DOT else _DEQUANT_ROWS
    return sbs, groups, 2, rows


# How the FMA mode reads x: element by element, or 8-byte packs of four f16 / bf16.
_X_SINGLE, _X_F16, _X_BF16 = 0, 1, 2
_X_KINDS = {torch.float32: _X_SINGLE, torch.float16: _X_F16, torch.bfloat16: _X_BF16}
_FLOAT_DTYPES = tuple(_X_KINDS)


def interpreting() -> bool:
    """Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1): CI's way to test them."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Triton code below keeps long argument lists on few lines.
# fmt: off
@triton.jit
def _move(w, src: tl.constexpr, dst: tl.constexpr):
    """``w`` shifted so that its bit ``src`` lands on bit ``dst``."""
    return w << (dst - src) if dst >= src else w >> (src - dst)


@triton.jit
def _unit(mantissa, one):
    """Mantissa bits (exponent bits clear) read as the float 1.mantissa, in [1, 2).

    ``one`` is 0x3F800000 passed at run time: as an immediate, ptxas would rebuild the mask or
    the exponent in a register before every LOP3 (two constants don't fit one instruction).
    """
    return (mantissa | one).to(tl.float32, bitcast=True)


@triton.jit
def _unit_or(low, top, one):
    """_unit of low | top. XOR (here equal to OR: the bits are disjoint) keeps the compiler from
    regrouping the ORs, so ``one`` joins ``low``'s mask op: two 3-input LOP3s, not three."""
    return ((low ^ one) | top).to(tl.float32, bitcast=True)


@triton.jit
def _load(ptrs, ok, other, EVEN: tl.constexpr):
    """A load that is masked only where K ends inside the step."""
    return tl.load(ptrs) if EVEN else tl.load(ptrs, mask=ok, other=other)


@triton.jit
def _affine(s, mn, BITS: tl.constexpr, OFFSET: tl.constexpr, MODE: tl.constexpr):
    """Per-group (a, b) of a plane: (scale, min) to dequantize, else w = a*f - b for f in [1, 2)."""
    if MODE == 2:
        a = s
        b = mn
    else:
        a = s * (1 << BITS)
        b = s * ((1 << BITS) + OFFSET) + mn
    return a, b


@triton.jit
def _x_quad(x_ptr, x64_ptr, e4, K, XKIND: tl.constexpr, EVEN: tl.constexpr):
    """x[4*e4 + k] for k = 0..3 as four f32 tensors: one 8-byte pack, or four loads for f32."""
    ok = 4 * e4 < K
    if XKIND == 0:
        x0 = _load(x_ptr + 4 * e4, ok, 0.0, EVEN).to(tl.float32)
        x1 = _load(x_ptr + 4 * e4 + 1, ok, 0.0, EVEN).to(tl.float32)
        x2 = _load(x_ptr + 4 * e4 + 2, ok, 0.0, EVEN).to(tl.float32)
        x3 = _load(x_ptr + 4 * e4 + 3, ok, 0.0, EVEN).to(tl.float32)
    else:
        pack = _load(x64_ptr + e4, ok, 0, EVEN)
        lo = pack.to(tl.int32)
        hi = (pack >> 32).to(tl.int32)
        if XKIND == 2:  # bf16 is the top half of an f32
            x0 = (lo << 16).to(tl.float32, bitcast=True)
            x1 = (lo & -65536).to(tl.float32, bitcast=True)
            x2 = (hi << 16).to(tl.float32, bitcast=True)
            x3 = (hi & -65536).to(tl.float32, bitcast=True)
        else:
            x0 = lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x1 = (lo >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x2 = hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x3 = (hi >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def _dot4(p, x0, x1, x2, x3, f0, f1, f2, f3):
    """p + x0*f0 + ... + x3*f3 as a chain of four FMAs."""
    p += x0 * f0
    p += x1 * f1
    p += x2 * f2
    p += x3 * f3
    return p


@triton.jit
def _assemble(f0, f1, f2, f3, BN: tl.constexpr):
    """Planes f[k] [BN, G, W] -> [BN, G*W*4], column 4*(W*g + u) + k: runs of consecutive K."""
    t = tl.join(tl.join(f0, f2), tl.join(f1, f3))  # [BN, G, W, k // 2, k % 2]
    return tl.reshape(t, (BN, t.shape[1] * t.shape[2] * 4))


@triton.jit
def _consume(acc, p0, p1, xs0, xs1, f00, f01, f02, f03, f10, f11, f12, f13, a0, b0, a1, b1,
             ebase, eb_run, rows, row_ok, x_ptr, x64_ptr, out_ptr, M, K, stride_xm,
             NPAR: tl.constexpr, PAR_STRIDE: tl.constexpr, BITS: tl.constexpr,
             OFFSET: tl.constexpr, XKIND: tl.constexpr, MODE: tl.constexpr,
             EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """Feed a sub-tile's planes f[par][k] (elements ebase + PAR_STRIDE*par + 4*word + k) to MODE.

    ``eb_run`` is the element index of each column of a par's assembled tile (DOT, DEQUANT).
    """
    if MODE == 0:
        e4 = ebase // 4 + tl.arange(0, f00.shape[2])[None, None, :]
        x0, x1, x2, x3 = _x_quad(x_ptr, x64_ptr, e4, K, XKIND, EVEN)
        p0 = _dot4(p0, x0, x1, x2, x3, f00, f01, f02, f03)
        xs0 += (x0 + x1) + (x2 + x3)
        if NPAR == 2:
            x0, x1, x2, x3 = _x_quad(x_ptr, x64_ptr, e4 + PAR_STRIDE // 4, K, XKIND, EVEN)
            p1 = _dot4(p1, x0, x1, x2, x3, f10, f11, f12, f13)
            xs1 += (x0 + x1) + (x2 + x3)
    elif MODE == 1:
        m = tl.arange(0, BM)[None, :]
        for par in tl.static_range(NPAR):
            if par == 0:
                w = _assemble(f00 * a0 - b0, f01 * a0 - b0, f02 * a0 - b0, f03 * a0 - b0, BN)
            else:
                w = _assemble(f10 * a1 - b1, f11 * a1 - b1, f12 * a1 - b1, f13 * a1 - b1, BN)
            at = eb_run[:, None] + PAR_STRIDE * par
            xmask = m < M
            if not EVEN:
                xmask = xmask & (at < K)
            xt = tl.load(x_ptr + m * stride_xm + at, mask=xmask, other=0.0)
            acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=PREC)
    else:
        # (f - 1) * 2**BITS - OFFSET is q exactly; then the reference's s*q - min, unfused.
        for par in tl.static_range(NPAR):
            if par == 0:
                v = _assemble(a0 * ((f00 - 1.0) * (1 << BITS) - OFFSET) - b0,
                              a0 * ((f01 - 1.0) * (1 << BITS) - OFFSET) - b0,
                              a0 * ((f02 - 1.0) * (1 << BITS) - OFFSET) - b0,
                              a0 * ((f03 - 1.0) * (1 << BITS) - OFFSET) - b0, BN)
            else:
                v = _assemble(a1 * ((f10 - 1.0) * (1 << BITS) - OFFSET) - b1,
                              a1 * ((f11 - 1.0) * (1 << BITS) - OFFSET) - b1,
                              a1 * ((f12 - 1.0) * (1 << BITS) - OFFSET) - b1,
                              a1 * ((f13 - 1.0) * (1 << BITS) - OFFSET) - b1, BN)
            at = eb_run[None, :] + PAR_STRIDE * par
            mask = tl.reshape(row_ok, (BN, 1))
            if not EVEN:
                mask = mask & (at < K)
            ptrs = out_ptr + tl.reshape(rows, (BN, 1)) * K + at
            tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)
    return acc, p0, p1, xs0, xs1


@triton.jit
def _runs(cols):
    """cols % 8: the position in a run of 8 consecutive elements (one word pair's bytes)."""
    return tl.max_contiguous(tl.multiple_of(cols % 8, 8), 8)


@triton.jit
def _partials(BN: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    """Zeroed per-step sums of the FMA mode: sum(x*f) per par [BN, G, W], sum(x) per par."""
    z = tl.zeros((BN, G, W), dtype=tl.float32)
    x = tl.zeros((1, G, W), dtype=tl.float32)
    return z, z, x, x


@triton.jit
def _fold(acc, p0, p1, xs0, xs1, a0, b0, a1, b1, NPAR: tl.constexpr, MODE: tl.constexpr):
    """FMA mode: add a step's sums, weights w = a*f - b, as a*sum(x*f) - b*sum(x)."""
    if MODE == 0:
        acc += a0 * p0 - b0 * xs0
        if NPAR == 2:
            acc += a1 * p1 - b1 * xs1
    return acc


@triton.jit
def _q4_plane(words, k: tl.constexpr, par: tl.constexpr, one):
    """Value f of nibble 2k+par (byte k, low or high half) of a 4-bit format."""
    return _unit(_move(words, 8 * k + 4 * par, 19) & 0x780000, one)


@triton.jit
def _q5_0_plane(words, high, k: tl.constexpr, par: tl.constexpr, one):
    """Q5_0 value f of nibble 2k+par; ``high`` has element k + 16par's top bit at bit k + 16par."""
    low = _move(words, 8 * k + 4 * par, 18) & 0x3C0000
    return _unit_or(low, _move(high, k + 16 * par, 22) & 0x400000, one)


@triton.jit
def _q8_plane(words, k: tl.constexpr, one):
    """Q8_0 value f of byte k: flipping its sign bit makes q + 128, an unsigned 8-bit field."""
    return ((_move(words, 8 * k, 15) & 0x7F8000) ^ (one | 0x400000)).to(tl.float32, bitcast=True)


@triton.jit
def _q5_k_plane(words, high, k: tl.constexpr, par: tl.constexpr, one):
    """Q5_K value f of nibble 2k+par; ``high`` has its top bit at bit 8k + par."""
    low = _move(words, 8 * k + 4 * par, 18) & 0x3C0000
    return _unit_or(low, _move(high, 8 * k + par, 22) & 0x400000, one)


@triton.jit
def _q6_plane(words, high, k: tl.constexpr, par: tl.constexpr, one):
    """Q6_K value f of nibble 2k+par; ``high`` has its two top bits at bit 8k + 4par."""
    low = _move(words, 8 * k + 4 * par, 17) & 0x1E0000
    return _unit_or(low, _move(high, 8 * k + 4 * par, 21) & 0x600000, one)


@triton.jit
def _step_q4_0(acc, s, one, one_g, qs_ptr, d_ptr, rows, row_ok, x_ptr, x64_ptr, out_ptr, M, K,
               stride_xm, SBS: tl.constexpr, XKIND: tl.constexpr, MODE: tl.constexpr,
               EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    # Group g = block 8*SBS*s + g (4 words); sub-tile h takes words 2h, 2h+1: nibble 2k+par of
    # word u is element 16par + 8h + 4u + k of the block.
    G: tl.constexpr = 8 * SBS
    nb = K // 32
    g = tl.arange(0, G)[None, :, None]
    u = tl.arange(0, 2)[None, None, :]
    cols = tl.arange(0, 8 * G)
    blk = s * G + g
    ok = blk < nb
    d = _load(d_ptr + rows * nb + s * G + g * one_g, ok, 0.0, EVEN).to(tl.float32)
    a, b = _affine(d, 0.0, 4, 8, MODE)
    p0, p1, xs0, xs1 = _partials(BN, G, 2)
    for h in tl.static_range(2):
        words = _load(qs_ptr + rows * (nb * 4) + blk * 4 + 2 * h + u, ok, 0, EVEN)
        eb_run = 32 * (s * G + cols // 8) + 8 * h + _runs(cols)
        acc, p0, p1, xs0, xs1 = _consume(
            acc, p0, p1, xs0, xs1,
            _q4_plane(words, 0, 0, one), _q4_plane(words, 1, 0, one),
            _q4_plane(words, 2, 0, one), _q4_plane(words, 3, 0, one),
            _q4_plane(words, 0, 1, one), _q4_plane(words, 1, 1, one),
            _q4_plane(words, 2, 1, one), _q4_plane(words, 3, 1, one),
            a, b, a, b, 32 * blk + 8 * h, eb_run, rows, row_ok, x_ptr, x64_ptr, out_ptr, M, K,
            stride_xm, 2, 16, 4, 8, XKIND, MODE, EVEN, BN, BM, PREC)
    return _fold(acc, p0, p1, xs0, xs1, a, b, a, b, 2, MODE)


@triton.jit
def _step_q5_0(acc, s, one, one_g, qs_ptr, qh_ptr, d_ptr, rows, row_ok, x_ptr, x64_ptr, out_ptr,
               M, K, stride_xm, SBS: tl.constexpr, XKIND: tl.constexpr, MODE: tl.constexpr,
               EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    # As Q4_0; bit 4 of element e of a block is bit e of its qh word.
    G: tl.constexpr = 8 * SBS
    nb = K // 32
    g = tl.arange(0, G)[None, :, None]
    u = tl.arange(0, 2)[None, None, :]
    cols = tl.arange(0, 8 * G)
    blk = s * G + g
    ok = blk < nb
    d = _load(d_ptr + rows * nb + s * G + g * one_g, ok, 0.0, EVEN).to(tl.float32)
    qh = _load(qh_ptr + rows * nb + s * G + g * one_g, ok, 0, EVEN)
    a, b = _affine(d, 0.0, 5, 16, MODE)
    p0, p1, xs0, xs1 = _partials(BN, G, 2)
    for h in tl.static_range(2):
        words = _load(qs_ptr + rows * (nb * 4) + blk * 4 + 2 * h + u, ok, 0, EVEN)
        high = qh >> (8 * h + 4 * u)
        eb_run = 32 * (s * G + cols // 8) + 8 * h + _runs(cols)
        acc, p0, p1, xs0, xs1 = _consume(
            acc, p0, p1, xs0, xs1,
            _q5_0_plane(words, high, 0, 0, one), _q5_0_plane(words, high, 1, 0, one),
            _q5_0_plane(words, high, 2, 0, one), _q5_0_plane(words, high, 3, 0, one),
            _q5_0_plane(words, high, 0, 1, one), _q5_0_plane(words, high, 1, 1, one),
            _q5_0_plane(words, high, 2, 1, one), _q5_0_plane(words, high, 3, 1, one),
            a, b, a, b, 32 * blk + 8 * h, eb_run, rows, row_ok, x_ptr, x64_ptr, out_ptr, M, K,
            stride_xm, 2, 16, 5, 16, XKIND, MODE, EVEN, BN, BM, PREC)
    return _fold(acc, p0, p1, xs0, xs1, a, b, a, b, 2, MODE)


@triton.jit
def _step_q8_0(acc, s, one, one_g, qs_ptr, d_ptr, rows, row_ok, x_ptr, x64_ptr, out_ptr, M, K,
               stride_xm, SBS: tl.constexpr, XKIND: tl.constexpr, MODE: tl.constexpr,
               EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    # Group g = block 8*SBS*s + g (8 words); sub-tile q takes words 2q, 2q+1: byte k of word u
    # is element 8q + 4u + k of the block.
    G: tl.constexpr = 8 * SBS
    nb = K // 32
    g = tl.arange(0, G)[None, :, None]
    u = tl.arange(0, 2)[None, None, :]
    cols = tl.arange(0, 8 * G)
    blk = s * G + g
    ok = blk < nb
    d = _load(d_ptr + rows * nb + s * G + g * one_g, ok, 0.0, EVEN).to(tl.float32)
    a, b = _affine(d, 0.0, 8, 128, MODE)
    p0, p1, xs0, xs1 = _partials(BN, G, 2)
    for q in tl.static_range(4):
        words = _load(qs_ptr + rows * (nb * 8) + blk * 8 + 2 * q + u, ok, 0, EVEN)
        f0 = _q8_plane(words, 0, one)
        eb_run = 32 * (s * G + cols // 8) + 8 * q + _runs(cols)
        acc, p0, p1, xs0, xs1 = _consume(
            acc, p0, p1, xs0, xs1,
            f0, _q8_plane(words, 1, one), _q8_plane(words, 2, one), _q8_plane(words, 3, one),
            f0, f0, f0, f0,
            a, b, a, b, 32 * blk + 8 * q, eb_run, rows, row_ok, x_ptr, x64_ptr, out_ptr, M, K,
            stride_xm, 1, 0, 8, 128, XKIND, MODE, EVEN, BN, BM, PREC)
    return _fold(acc, p0, p1, xs0, xs1, a, b, a, b, 1, MODE)


@triton.jit
def _k_scales(hdr_ptr, half16_ptr, base, chunk, ok, par: tl.constexpr, BITS: tl.constexpr,
              MODE: tl.constexpr, EVEN: tl.constexpr):
    """Plane coefficients [BN, G, 1] of the Q4_K/Q5_K sub-blocks j = 2*chunk + par.

    The 12 scale bytes (words 1..3 of the block) hold 6-bit scales sc and mins m: for j < 4,
    sc = s[j] & 63 and m = s[j+4] & 63; for j >= 4 the low 4 bits are the nibbles of s[j+4]
    and the top 2 bits are the top bits of s[j-4] (sc) and s[j] (m).
    """
    w1 = _load(hdr_ptr + base + 1, ok, 0, EVEN)
    w2 = _load(hdr_ptr + base + 2, ok, 0, EVEN)
    w3 = _load(hdr_ptr + base + 3, ok, 0, EVEN)
    d = _load(half16_ptr + 2 * base, ok, 0.0, EVEN).to(tl.float32)
    dmin = _load(half16_ptr + 2 * base + 1, ok, 0.0, EVEN).to(tl.float32)
    upper = chunk >= 2  # sub-blocks 4..7
    shift = 16 * (chunk % 2) + 8 * par  # bit offset of byte j % 4
    low_mask = tl.where(upper, 15, 63)
    top_mask = tl.where(upper, 0x30, 0)
    sc = ((tl.where(upper, w3, w1) >> shift) & low_mask) | ((w1 >> (shift + 2)) & top_mask)
    m = (((tl.where(upper, w3, w2) >> (shift + 4 * upper.to(tl.int32))) & low_mask)
         | ((w2 >> (shift + 2)) & top_mask))
    return _affine(d * sc.to(tl.float32), dmin * m.to(tl.float32), BITS, 0, MODE)


@triton.jit
def _step_q4_k(acc, s, one, one_g, hdr_ptr, half16_ptr, rows, row_ok, x_ptr, x64_ptr, out_ptr, M,
               K, stride_xm, SBS: tl.constexpr, XKIND: tl.constexpr, MODE: tl.constexpr,
               EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    # 36 words a block: d|dmin, 3 of scales, 32 of quants. Group g = 64-element chunk g % 4
    # (words 4 + 8*chunk..) of super-block SBS*s + g // 4; sub-tile q takes its words 2q, 2q+1,
    # so a thread keeps one group's scales all step. Nibble 2k+par of word u: element
    # 64*chunk + 32par + 8q + 4u + k, sub-block 2*chunk + par.
    G: tl.constexpr = 4 * SBS
    g = tl.arange(0, G)[None, :, None]
    u = tl.arange(0, 2)[None, None, :]
    cols = tl.arange(0, 8 * G)
    chunk = g % 4
    sb = s * SBS + g // 4
    ok = sb < K // 256
    base = rows * (K // 256 * 36) + sb * 36
    a0, b0 = _k_scales(hdr_ptr, half16_ptr, base, chunk, ok, 0, 4, MODE, EVEN)
    a1, b1 = _k_scales(hdr_ptr, half16_ptr, base, chunk, ok, 1, 4, MODE, EVEN)
    p0, p1, xs0, xs1 = _partials(BN, G, 2)
    for q in tl.static_range(4):
        words = _load(hdr_ptr + base + 4 + 8 * chunk + 2 * q + u, ok, 0, EVEN)
        eb_run = 64 * (s * G + cols // 8) + 8 * q + _runs(cols)
        acc, p0, p1, xs0, xs1 = _consume(
            acc, p0, p1, xs0, xs1,
            _q4_plane(words, 0, 0, one), _q4_plane(words, 1, 0, one),
            _q4_plane(words, 2, 0, one), _q4_plane(words, 3, 0, one),
            _q4_plane(words, 0, 1, one), _q4_plane(words, 1, 1, one),
            _q4_plane(words, 2, 1, one), _q4_plane(words, 3, 1, one),
            a0, b0, a1, b1, 256 * sb + 64 * chunk + 8 * q, eb_run, rows, row_ok, x_ptr, x64_ptr,
            out_ptr, M, K, stride_xm, 2, 32, 4, 0, XKIND, MODE, EVEN, BN, BM, PREC)
    return _fold(acc, p0, p1, xs0, xs1, a0, b0, a1, b1, 2, MODE)


@triton.jit
def _step_q5_k(acc, s, one, one_g, hdr_ptr, half16_ptr, rows, row_ok, x_ptr, x64_ptr, out_ptr, M,
               K, stride_xm, SBS: tl.constexpr, XKIND: tl.constexpr, MODE: tl.constexpr,
               EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    # 44 words a block: as Q4_K with 8 words of high bits (4..11) before the quants (12..43).
    # Element 32j + l takes bit j of high byte l: for nibble 2k+par of word u in sub-tile q of
    # a chunk, bit 8k + 2*chunk + par of high word 2q + u.
    G: tl.constexpr = 4 * SBS
    g = tl.arange(0, G)[None, :, None]
    u = tl.arange(0, 2)[None, None, :]
    cols = tl.arange(0, 8 * G)
    chunk = g % 4
    sb = s * SBS + g // 4
    ok = sb < K // 256
    base = rows * (K // 256 * 44) + sb * 44
    a0, b0 = _k_scales(hdr_ptr, half16_ptr, base, chunk, ok, 0, 5, MODE, EVEN)
    a1, b1 = _k_scales(hdr_ptr, half16_ptr, base, chunk, ok, 1, 5, MODE, EVEN)
    p0, p1, xs0, xs1 = _partials(BN, G, 2)
    for q in tl.static_range(4):
        words = _load(hdr_ptr + base + 12 + 8 * chunk + 2 * q + u, ok, 0, EVEN)
        high = _load(hdr_ptr + base + 4 + 2 * q + u, ok, 0, EVEN) >> (2 * chunk)
        eb_run = 64 * (s * G + cols // 8) + 8 * q + _runs(cols)
        acc, p0, p1, xs0, xs1 = _consume(
            acc, p0, p1, xs0, xs1,
            _q5_k_plane(words, high, 0, 0, one), _q5_k_plane(words, high, 1, 0, one),
            _q5_k_plane(words, high, 2, 0, one), _q5_k_plane(words, high, 3, 0, one),
            _q5_k_plane(words, high, 0, 1, one), _q5_k_plane(words, high, 1, 1, one),
            _q5_k_plane(words, high, 2, 1, one), _q5_k_plane(words, high, 3, 1, one),
            a0, b0, a1, b1, 256 * sb + 64 * chunk + 8 * q, eb_run, rows, row_ok, x_ptr, x64_ptr,
            out_ptr, M, K, stride_xm, 2, 32, 5, 0, XKIND, MODE, EVEN, BN, BM, PREC)
    return _fold(acc, p0, p1, xs0, xs1, a0, b0, a1, b1, 2, MODE)


@triton.jit
def _q6_group_base(grp):
    """Element offset in its Q6_K super-block of group grp % 8 = 4h + 2c + v (see _step_q6_k)."""
    return 128 * ((grp // 4) % 2) + 32 * ((grp // 2) % 2) + 16 * (grp % 2)


@triton.jit
def _step_q6_k(acc, s, one, one_g, ql_ptr, qh_ptr, sc_ptr, d_ptr, rows, row_ok, x_ptr, x64_ptr,
               out_ptr, M, K, stride_xm, SBS: tl.constexpr, XKIND: tl.constexpr,
               MODE: tl.constexpr, EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
               PREC: tl.constexpr):
    # Group g of super-block SBS*s + g // 8; g % 8 = 4h + 2c + v: half h of the super-block,
    # 32-byte column c of its low nibbles, 16-byte piece v: low words 4*(g % 8).., high words
    # 8h + 4v... Sub-tile t takes words 2t, 2t+1: nibble 2k+par of word u is element
    # 128h + 32c + 64par + 16v + 8t + 4u + k; its two high bits are bits 8k + 4par + 2c of its
    # high word; its scale is number 8h + 2c + 4par + v.
    G: tl.constexpr = 8 * SBS
    nb = K // 256
    g = tl.arange(0, G)[None, :, None]
    u = tl.arange(0, 2)[None, None, :]
    cols = tl.arange(0, 8 * G)
    gg = g % 8
    c = (gg // 2) % 2
    sb = s * SBS + g // 8
    ok = sb < nb
    d = _load(d_ptr + rows * nb + s * SBS + (g // 8) * one_g, ok, 0.0, EVEN).to(tl.float32)
    sc_at = sc_ptr + rows * (nb * 16) + sb * 16 + (8 * (gg // 4) + 2 * c + gg % 2) * one_g
    a0, b0 = _affine(d * _load(sc_at, ok, 0, EVEN).to(tl.float32), 0.0, 6, 32, MODE)
    a1, b1 = _affine(d * _load(sc_at + 4, ok, 0, EVEN).to(tl.float32), 0.0, 6, 32, MODE)
    p0, p1, xs0, xs1 = _partials(BN, G, 2)
    high_at = qh_ptr + rows * (nb * 16) + sb * 16 + 8 * (gg // 4) + 4 * (gg % 2) + u
    for t in tl.static_range(2):
        words = _load(ql_ptr + rows * (nb * 32) + sb * 32 + 4 * gg + 2 * t + u, ok, 0, EVEN)
        high = _load(high_at + 2 * t, ok, 0, EVEN) >> (2 * c)
        eb_run = (256 * (s * SBS + cols // 64) + _q6_group_base(cols // 8) + 8 * t
                  + _runs(cols))
        acc, p0, p1, xs0, xs1 = _consume(
            acc, p0, p1, xs0, xs1,
            _q6_plane(words, high, 0, 0, one), _q6_plane(words, high, 1, 0, one),
            _q6_plane(words, high, 2, 0, one), _q6_plane(words, high, 3, 0, one),
            _q6_plane(words, high, 0, 1, one), _q6_plane(words, high, 1, 1, one),
            _q6_plane(words, high, 2, 1, one), _q6_plane(words, high, 3, 1, one),
            a0, b0, a1, b1, 256 * sb + _q6_group_base(g) + 8 * t, eb_run, rows, row_ok, x_ptr,
            x64_ptr, out_ptr, M, K, stride_xm, 2, 64, 6, 32, XKIND, MODE, EVEN, BN, BM, PREC)
    return _fold(acc, p0, p1, xs0, xs1, a0, b0, a1, b1, 2, MODE)


@triton.jit
def _step_dense(acc, s, w_ptr, rows, row_ok, x_ptr, out_ptr, M, K, stride_xm,
                MODE: tl.constexpr, EVEN: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                PREC: tl.constexpr):
    """F16/BF16 weights: 256 elements of K per step, as [BN, 8, 32] in the FMA mode, four
    [BN, 64] sub-tiles in the DOT mode (the quant formats' tl.dot size) and one [BN, 256] tile
    in the DEQUANT mode."""
    row2 = tl.reshape(rows, (BN, 1))
    if MODE == 0:
        kidx = s * 256 + 32 * tl.arange(0, 8)[None, :, None] + tl.arange(0, 32)[None, None, :]
        w = _load(w_ptr + rows * K + kidx, kidx < K, 0.0, EVEN)
        xv = _load(x_ptr + kidx, kidx < K, 0.0, EVEN)
        acc += w.to(tl.float32) * xv.to(tl.float32)
    elif MODE == 1:
        m = tl.arange(0, BM)[None, :]
        for t in tl.static_range(4):
            kidx = s * 256 + 64 * t + tl.arange(0, 64)
            w = _load(w_ptr + row2 * K + kidx[None, :], kidx[None, :] < K, 0.0, EVEN)
            xmask = m < M
            if not EVEN:
                xmask = xmask & (kidx[:, None] < K)
            xt = tl.load(x_ptr + m * stride_xm + kidx[:, None], mask=xmask, other=0.0)
            acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=PREC)
    else:
        kidx = s * 256 + tl.arange(0, 256)
        kmask = kidx[None, :] < K
        w = _load(w_ptr + row2 * K + kidx[None, :], kmask, 0.0, EVEN)
        mask = tl.reshape(row_ok, (BN, 1))
        if not EVEN:
            mask = mask & kmask
        tl.store(out_ptr + row2 * K + kidx[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
    return acc


@triton.jit
def _prefetch_rows(p0, p1, p2, p3, first, count, K, FMT: tl.constexpr):
    """L2 prefetch of rows [first, first + count) of each of the format's planes (packing.py's
    layouts; a plane's row is a fixed number of bytes per element of K)."""
    first = first.to(tl.int64)
    count = count.to(tl.int64)
    if FMT == 0:  # Q4_0: quants (K/2 bytes a row), f16 scales (K/16)
        prefetch_l2(p0, first * (K // 2), count * (K // 2))
        prefetch_l2(p1, first * (K // 16), count * (K // 16))
    elif FMT == 1:  # Q5_0: quants, high bits (K/8), scales
        prefetch_l2(p0, first * (K // 2), count * (K // 2))
        prefetch_l2(p1, first * (K // 8), count * (K // 8))
        prefetch_l2(p2, first * (K // 16), count * (K // 16))
    elif FMT == 2:  # Q8_0: quants (K), scales
        prefetch_l2(p0, first * K, count * K)
        prefetch_l2(p1, first * (K // 16), count * (K // 16))
    elif FMT == 3:  # Q4_K: 144-byte blocks in place
        prefetch_l2(p0, first * (K // 256 * 144), count * (K // 256 * 144))
    elif FMT == 4:  # Q5_K: 176-byte blocks in place
        prefetch_l2(p0, first * (K // 256 * 176), count * (K // 256 * 176))
    elif FMT == 5:  # Q6_K: ql (K/2), qh (K/4), int8 scales (K/16), f16 d (K/128)
        prefetch_l2(p0, first * (K // 2), count * (K // 2))
        prefetch_l2(p1, first * (K // 4), count * (K // 4))
        prefetch_l2(p2, first * (K // 16), count * (K // 16))
        prefetch_l2(p3, first * (K // 128), count * (K // 128))
    else:  # F16 / BF16 rows
        prefetch_l2(p0, first * (2 * K), count * (2 * K))


@triton.jit(do_not_specialize=["group_stride"])
def _quant_kernel(x_ptr, x64_ptr, out_ptr, p0, p1, p2, p3, M, N, K, stride_xm, stride_om,
                  n_steps, steps_per_split, one_bits, group_stride, FMT: tl.constexpr,
                  MODE: tl.constexpr, G: tl.constexpr, W: tl.constexpr, SBS: tl.constexpr,
                  BN: tl.constexpr, BM: tl.constexpr, XKIND: tl.constexpr, EVEN: tl.constexpr,
                  PARTIAL: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                  GATED: tl.constexpr = 0, PREFETCH: tl.constexpr = False):
    """Rows [BN*r, +BN) of out, over K steps [pid1*steps_per_split, +steps_per_split).

    DOT mode: program pid0 = r * m_tiles + t also takes rows [BM*t, +BM) of x (t varies
    fastest, so the programs that read one weight tile run together and share it in L2).
    ``one_bits`` is 0x3F800000 (see _unit). ``group_stride`` is 1, multiplied into the offsets
    of per-group scales: unknown to the compiler, it keeps their loads from being vectorized
    along the groups, which would give them a layout other than the words' and a conversion
    of every value derived from them inside the loop. GATED = 1 + an activation kind
    (FMA mode): W is a gated MLP's [gate | up] (N = 2F rows); each program takes BN / 2 rows
    of each half and stores act(gate) * up into F columns (see `quant_matmul`). PREFETCH (FMA
    mode, K whole in every program): the program's rows of every plane are asked of the L2
    before the wait for the previous kernel (pdl.prefetch_l2).
    """
    if PREFETCH:
        if GATED:
            first = tl.program_id(0) * (BN // 2)
            count = tl.minimum(BN // 2, N // 2 - first)
            _prefetch_rows(p0, p1, p2, p3, first, count, K, FMT)
            _prefetch_rows(p0, p1, p2, p3, N // 2 + first, count, K, FMT)
        else:
            first = tl.program_id(0) * BN
            _prefetch_rows(p0, p1, p2, p3, first, tl.minimum(BN, N - first), K, FMT)
    wait_for_inputs(PDL)
    pid_k = tl.program_id(1)
    row_block = tl.program_id(0)
    m_first = 0
    if MODE == 1:
        m_tiles = tl.cdiv(M, BM)
        m_first = (row_block % m_tiles) * BM
        row_block = row_block // m_tiles
        x_ptr += m_first * stride_xm
    m_left = M - m_first  # rows of x from this program's first on
    if GATED:  # rows [gate rows of this program | the same rows of up]
        i = tl.arange(0, BN)
        in_half = row_block * (BN // 2) + i % (BN // 2)
        row_ids = in_half + (i // (BN // 2)) * (N // 2)
        row_exists = in_half < N // 2
    else:
        row_ids = row_block * BN + tl.arange(0, BN)
        row_exists = row_ids < N
    row_ok = row_exists[:, None, None]
    # Rows past N read row N-1 (valid memory, no masks in the loop); only stores are masked.
    rows = tl.minimum(row_ids, N - 1).to(tl.int64)[:, None, None]
    if MODE == 1:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, G, W), dtype=tl.float32)
    first = pid_k * steps_per_split
    one = one_bits
    one_g = group_stride
    for s in range(first, tl.minimum(first + steps_per_split, n_steps)):
        if FMT == 0:
            acc = _step_q4_0(acc, s, one, one_g, p0, p1, rows, row_ok, x_ptr, x64_ptr, out_ptr,
                             m_left, K, stride_xm, SBS, XKIND, MODE, EVEN, BN, BM, PREC)
        elif FMT == 1:
            acc = _step_q5_0(acc, s, one, one_g, p0, p1, p2, rows, row_ok, x_ptr, x64_ptr,
                             out_ptr, m_left, K, stride_xm, SBS, XKIND, MODE, EVEN, BN, BM, PREC)
        elif FMT == 2:
            acc = _step_q8_0(acc, s, one, one_g, p0, p1, rows, row_ok, x_ptr, x64_ptr, out_ptr,
                             m_left, K, stride_xm, SBS, XKIND, MODE, EVEN, BN, BM, PREC)
        elif FMT == 3:
            acc = _step_q4_k(acc, s, one, one_g, p0, p1, rows, row_ok, x_ptr, x64_ptr, out_ptr,
                             m_left, K, stride_xm, SBS, XKIND, MODE, EVEN, BN, BM, PREC)
        elif FMT == 4:
            acc = _step_q5_k(acc, s, one, one_g, p0, p1, rows, row_ok, x_ptr, x64_ptr, out_ptr,
                             m_left, K, stride_xm, SBS, XKIND, MODE, EVEN, BN, BM, PREC)
        elif FMT == 5:
            acc = _step_q6_k(acc, s, one, one_g, p0, p1, p2, p3, rows, row_ok, x_ptr, x64_ptr,
                             out_ptr, m_left, K, stride_xm, SBS, XKIND, MODE, EVEN, BN, BM, PREC)
        else:
            acc = _step_dense(acc, s, p0, rows, row_ok, x_ptr, out_ptr, m_left, K, stride_xm, MODE,
                              EVEN, BN, BM, PREC)
    if MODE == 0:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)
        ptrs = out_ptr + row_ids
        mask = row_exists
        if GATED and not PARTIAL:  # the split sums' kernel applies it otherwise
            gate, up = tl.split(tl.permute(tl.reshape(res, (2, BN // 2)), (1, 0)))
            ids = row_block * (BN // 2) + tl.arange(0, BN // 2)
            ptrs = out_ptr + ids
            mask = ids < N // 2
            res = _gated_rounded(gate, up, out_ptr.dtype.element_ty, GATED - 1)
    elif MODE == 1:
        res = acc
        m = m_first + tl.arange(0, BM)[None, :]
        ptrs = out_ptr + m * stride_om + row_ids[:, None]
        mask = (row_ids < N)[:, None] & (m < M)
    if MODE != 2:
        if PARTIAL:  # the scratch is [splits, M, N] with stride_om = N
            tl.store(ptrs + pid_k.to(tl.int64) * M * N, res, mask=mask)
        else:
            tl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rounded(gate, up, dtype: tl.constexpr, KIND: tl.constexpr):
    """act(gate) * up from f32 sums, each rounded to `dtype` first as if stored and read back:
    the bits of the product followed by kernels.activation's launch."""
    return gated_value(gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32), KIND)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, total, N, stride_om, SPLIT: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr, GATED: tl.constexpr = 0):
    """out[m, n] = sum over splits of part[split, m, n], in f32, stored in out's dtype. GATED
    (1 + an activation kind, one row): part's N = 2 * out's columns are [gate | up], and
    out[n] = act(gate[n]) * up[n]."""
    wait_for_inputs(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + split * total * (2 if GATED else 1) + offs, mask=mask, other=0.0)
    if GATED:
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in tl.static_range(SPLIT):
            up += tl.load(part_ptr + (2 * split + 1) * total + offs, mask=mask, other=0.0)
        acc = _gated_rounded(acc, up, out_ptr.dtype.element_ty, GATED - 1)
    dst = (offs // N) * stride_om + offs % N
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
# fmt: on


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of the device (a token 2 under the interpreter, so splits get exercised)."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _launch_args(weight: PackedWeight) -> list[torch.Tensor]:
    planes = list(weight.planes)
    return planes + [planes[0]] * (4 - len(planes))


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise MetallicError(
            f"the quantized-matmul kernels run on CUDA (or under TRITON_INTERPRET=1), "
            f"not on {t.device.type}"
        )


def _as_packed(
    weight: torch.Tensor | PackedWeight, ggml_type: GGMLQuantizationType | int, n: int, k: int
) -> PackedWeight:
    if isinstance(weight, PackedWeight):
        qtype = check_shape(ggml_type, n, k)
        if (weight.ggml_type, weight.n, weight.k) != (qtype, n, k):
            raise MetallicError(
                f"packed weight is a [{weight.n}, {weight.k}] {weight.ggml_type.name} matrix, "
                f"not [{n}, {k}] {qtype.name}"
            )
        return weight
    return prepare_weight(weight, ggml_type, n, k)


def dequantize_gpu(
    weight: torch.Tensor | PackedWeight,
    ggml_type: GGMLQuantizationType | int,
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [n, k] matrix in ``dtype``; in float32 bit-exact against metallic.quant.reference.

    ``out`` (a contiguous [n, k] tensor, such as a row slice of a stacked matrix) receives it."""
    packed = _as_packed(weight, ggml_type, n, k)
    _check_device(packed.planes[0])
    if out is not None:
        if out.shape != (n, k) or not out.is_contiguous():
            raise MetallicError(f"out must be a contiguous [{n}, {k}] tensor")
        dtype = out.dtype
    if dtype not in _FLOAT_DTYPES:
        raise MetallicError(f"dequantize_gpu writes f32, f16 or bf16, not {dtype}")
    fmt = _FMT_IDS[packed.ggml_type]
    sbs, groups, words, rows = _geometry(fmt, _MODE_DEQUANT, k)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    n_steps = triton.cdiv(k, sbs * STEP)
    _quant_kernel[(triton.cdiv(n, rows), n_steps)](
        out, out, out, *_launch_args(packed), 0, n, k, 0, 0, n_steps, 1, _ONE_BITS, 1,
        FMT=fmt, MODE=_MODE_DEQUANT, G=groups, W=words, SBS=sbs, BN=rows, BM=1,
        XKIND=_X_SINGLE,
        EVEN=k % (sbs * STEP) == 0, PARTIAL=False, PREC="ieee",
        num_warps=_DEQUANT_WARPS, enable_fp_fusion=False, **pdl_launch(out.device),
    )  # fmt: skip
    return out


def _steps_per_split(
    programs: int, n_steps: int, nbytes: int, split_bytes: int, per_sm: int, device: torch.device
) -> int:
    """K steps per program: split K until there are about ``per_sm`` programs per multiprocessor,
    unless the matrix is so small that the launch of the merge would cost more than the split
    saves, or the f32 partial sums (``split_bytes`` a split) would pass _MAX_SCRATCH_BYTES."""
    if nbytes < _MIN_SPLIT_BYTES and device.type == "cuda":
        return n_steps
    splits = min(n_steps, max(1, triton.cdiv(per_sm * sm_count(device), programs)))
    splits = max(1, min(splits, _MAX_SCRATCH_BYTES // split_bytes))
    return triton.cdiv(n_steps, splits)


def _packed_x(x: torch.Tensor) -> torch.Tensor:
    """x's rows as int64 packs of four 16-bit values; x itself where that can't be (f32 too)."""
    if x.dtype == torch.float32 or x.shape[0] != 1 or x.shape[1] % 4:
        return x
    if x.stride(0) % 4 or x.data_ptr() % 8:
        x = x.contiguous()
    return x.view(torch.int64)


def quant_matmul(
    x: torch.Tensor,
    weight: torch.Tensor | PackedWeight,
    ggml_type: GGMLQuantizationType | int,
    n: int,
    k: int,
    *,
    steps_per_split: int | None = None,
    tile: DotTile | None = None,
    out: torch.Tensor | None = None,
    gated: str | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for x [M, k] (f16/bf16/f32) and W [n, k] in ggml blocks; [M, n] in x's dtype.

    ``weight`` is the raw GGUF bytes or, better, ``prepare_weight``'s result (raw Q4_0, Q5_0,
    Q8_0 and Q6_K are repacked on every call). Accumulation is f32. M = 1 runs the FMA mode,
    larger M the DOT mode with dot_tile's geometry (or ``tile``): each weight is read and
    dequantized once per tile of M. ``steps_per_split`` (K steps per program; a step is 256
    elements or, for M = 1, up to 2048) overrides the split-K choice. ``out`` (an [M, n] tensor
    of x's dtype whose rows are contiguous, such as a column slice of a wider output) receives
    the result in place. ``gated`` ("silu", "gelu_tanh"; one row, `fuses_gate`): W is a gated
    MLP's [gate | up] and the result [1, n / 2] is ``gated_activation`` of the product, applied
    by the product's own kernel (a decode step's activation launch fewer), bit for bit.
    """
    if gated is not None and not fuses_gate(x.shape[0], ggml_type, n):
        raise MetallicError(
            f"quant_matmul applies a gated activation to one row against a quantized [gate | up] "
            f"of even rows, not {x.shape[0]} rows against {T(ggml_type).name} [{n}, {k}]"
        )
    if gated is not None and gated not in ACTIVATION_KINDS:
        raise MetallicError(
            f"unknown activation {gated!r} (expected one of {sorted(ACTIVATION_KINDS)})"
        )
    if x.dim() != 2 or x.shape[1] != k:
        raise MetallicError(f"x must be [M, {k}], got {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise MetallicError(f"x must be f32, f16 or bf16, got {x.dtype}")
    if steps_per_split is not None and steps_per_split < 1:
        raise MetallicError(f"steps_per_split must be at least 1, got {steps_per_split}")
    packed = _as_packed(weight, ggml_type, n, k)
    _check_device(x)
    if x.device != packed.device:
        raise MetallicError(f"x is on {x.device} but the weight is on {packed.device}")
    m = x.shape[0]
    n_out = n // 2 if gated else n
    if out is not None and (out.shape != (m, n_out) or out.dtype != x.dtype or out.stride(1) != 1):
        raise MetallicError(
            f"out must be [{m}, {n_out}] {x.dtype} with contiguous rows, got {list(out.shape)} "
            f"{out.dtype} strides {out.stride()}"
        )
    if out is None:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    fmt = _FMT_IDS[packed.ggml_type]
    if m == 1:
        mode, tile, m_tiles = _MODE_FMA, None, 1
        per_sm, options = _PROGRAMS_PER_SM, {"num_warps": 4}
    else:
        mode = _MODE_DOT
        tile = tile or dot_tile(m, packed.ggml_type)
        m_tiles = triton.cdiv(m, tile.bm)
        per_sm, options = tile.programs_per_sm, {"num_warps": tile.warps, "num_stages": tile.stages}
    sbs, groups, words, rows = _geometry(fmt, mode, k, tile)
    row_blocks = triton.cdiv(n_out, rows // 2) if gated else triton.cdiv(n, rows)
    n_steps = triton.cdiv(k, sbs * STEP)
    per_split = steps_per_split or _steps_per_split(
        row_blocks * m_tiles, n_steps, packed.nbytes, 4 * m * n, per_sm, x.device
    )
    splits = triton.cdiv(n_steps, per_split)
    target = out
    if splits > 1:
        target = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    x64 = _packed_x(x)
    _quant_kernel[(row_blocks * m_tiles, splits)](
        x, x64, target, *_launch_args(packed), m, n, k, x.stride(0),
        n if splits > 1 else out.stride(0), n_steps, per_split,
        _ONE_BITS, 1,
        FMT=fmt, MODE=mode, G=groups, W=words, SBS=sbs, BN=rows,
        BM=tile.bm if tile else 1, XKIND=_X_SINGLE if x64 is x else _X_KINDS[x.dtype],
        EVEN=k % (sbs * STEP) == 0, PARTIAL=splits > 1,
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        GATED=0 if gated is None else 1 + ACTIVATION_KINDS[gated],
        PREFETCH=mode == _MODE_FMA and splits == 1 and prefetch_enabled(x.device),
        enable_fp_fusion=True, **options, **pdl_launch(x.device),
    )  # fmt: skip
    if splits > 1:
        sum_splits(target, out, gated)
    return out


def fuses_gate(m: int, ggml_type: GGMLQuantizationType | int, n: int) -> bool:
    """Whether `quant_matmul(..., gated=...)` takes m rows against a [gate | up] of n rows in
    this format: one row (the FMA mode), block formats, and gate and up of equal rows."""
    return m == 1 and _FMT_IDS[T(ggml_type)] != _FMT_DENSE and n % 2 == 0


def sum_splits(partials: torch.Tensor, out: torch.Tensor, gated: str | None = None) -> None:
    """out [M, N] (rows contiguous) = the sum over splits of f32 partials [splits, M, N]; with
    `gated` (one row): partials [splits, 1, 2N] of [gate | up] and out = act(gate) * up."""
    m, n = out.shape
    total = m * n
    block = 1024
    _sum_splits_kernel[(triton.cdiv(total, block),)](
        partials,
        out,
        total,
        n,
        out.stride(0),
        SPLIT=partials.shape[0],
        BLOCK=block,
        GATED=0 if gated is None else 1 + ACTIVATION_KINDS[gated],
        num_warps=4,
        **pdl_launch(out.device),
    )
