"""x rounded to int8 blocks for the dp4a decode products (quant_gemv), wherever x is made.

Blocks of 32 elements: signed 8-bit quants, one f32 scale (amax / 127) and each 16-quant half's
sum (for the K-quant mins). `quant_gemv.quantize_x` rounds rows in a launch of its own; the norm
and activation kernels that produce decode rows round them in their own launch with the same code,
so the bits are the same either way. Rows are stacked: row r's blocks follow row r - 1's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

X_BLOCK = 32  # elements of x per f32 scale


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


def empty_quantized_x(k: int, device: torch.device, rows: int = 1) -> tuple[torch.Tensor, ...]:
    """Buffers for `rows` rows of x [K] rounded as quantize_x returns them, rows stacked:
    quants [rows * K], scales [rows * K / 32], half-block sums [rows * K / 16]."""
    n_blocks = rows * k // X_BLOCK
    return (
        torch.empty(rows * k, dtype=torch.int8, device=device),
        torch.empty(n_blocks, dtype=torch.float32, device=device),
        torch.empty(2 * n_blocks, dtype=torch.float32, device=device),
    )
