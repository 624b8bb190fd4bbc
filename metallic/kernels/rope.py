"""Rotary position embeddings as one in-place Triton kernel over queries and keys together.

Computes exactly `metallic.ops.rope.apply_rope` (f32 math, the cos/sin of a `RopeTable`). Working
in place means the dims past rope_dim are never touched, and one launch serves q and k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metallic.errors import MetallicError
from metallic.kernels.pdl import pdl_launch, wait_for_inputs


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    n_q_heads,
    n_heads,
    half,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_table,
    NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_ok = pairs < half
    cos, sin, q_rows, is_q, k_rows, is_k = _token_heads(
        pos_ptr, cos_ptr, sin_ptr, pairs, pair_ok, n_q_heads, n_heads, stride_qt, stride_qh,
        stride_kt, stride_kh, stride_table, BLOCK_H,
    )  # fmt: skip
    if NEOX:  # pairs (i, i + half): two contiguous halves
        _rotate_halves(q_ptr, q_rows, is_q, pairs, pair_ok, half, cos, sin)
        _rotate_halves(k_ptr, k_rows, is_k, pairs, pair_ok, half, cos, sin)
    else:  # pairs (2i, 2i + 1): one contiguous load, split into its even and odd elements
        _rotate_adjacent(q_ptr, q_rows, is_q, half, cos, sin, BLOCK_HALF)
        _rotate_adjacent(k_ptr, k_rows, is_k, half, cos, sin, BLOCK_HALF)


@triton.jit
def _token_heads(pos_ptr, cos_ptr, sin_ptr, pairs, pair_ok, n_q_heads, n_heads, stride_qt,
                 stride_qh, stride_kt, stride_kh, stride_table, BLOCK_H: tl.constexpr):  # fmt: skip
    """This program's token and heads (q heads first, then k heads): the cos/sin of the token's
    position [1, pairs], and each head's row offset and validity in q and in k."""
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_table + pairs, mask=pair_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + pairs, mask=pair_ok, other=0.0)[None, :]
    q_rows = token * stride_qt + heads * stride_qh
    k_rows = token * stride_kt + (heads - n_q_heads) * stride_kh
    is_q = heads < n_q_heads
    is_k = (heads >= n_q_heads) & (heads < n_heads)
    return cos, sin, q_rows, is_q, k_rows, is_k


@triton.jit
def _rotate_halves(ptr, rows, row_ok, pairs, pair_ok, half, cos, sin):
    """Rotate the pairs (i, i + half) of the rows at `rows` in place."""
    mask = row_ok[:, None] & pair_ok[None, :]
    a_ptrs = ptr + rows[:, None] + pairs[None, :]
    b_ptrs = a_ptrs + half
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    dtype = ptr.dtype.element_ty
    tl.store(a_ptrs, (a * cos - b * sin).to(dtype), mask=mask)
    tl.store(b_ptrs, (a * sin + b * cos).to(dtype), mask=mask)


@triton.jit
def _rotate_adjacent(ptr, rows, row_ok, half, cos, sin, BLOCK_HALF: tl.constexpr):
    """Rotate the pairs (2i, 2i + 1) of the rows at `rows` in place, with contiguous loads
    and stores (strided ones of every other element run at a fraction of the bandwidth)."""
    cols = tl.arange(0, 2 * BLOCK_HALF)
    mask = row_ok[:, None] & (cols < 2 * half)[None, :]
    ptrs = ptr + rows[:, None] + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    a, b = tl.split(tl.reshape(x, (x.shape[0], BLOCK_HALF, 2)))
    y = tl.join(a * cos - b * sin, a * sin + b * cos)
    tl.store(ptrs, tl.reshape(y, (x.shape[0], 2 * BLOCK_HALF)).to(ptr.dtype.element_ty), mask=mask)


def _head_strides(t: torch.Tensor, name: str) -> tuple[int, int]:
    if t.dim() != 3 or t.stride(-1) != 1:
        raise MetallicError(
            f"apply_rope: {name} must be [T, H, D] with a contiguous last dim, "
            f"got shape {tuple(t.shape)} strides {t.stride()}"
        )
    return t.stride(0), t.stride(1)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    neox: bool,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (or None) IN PLACE by each token's position.

    cos/sin are a `RopeTable`'s [P, rope_dim / 2] f32 tables, already grown past the largest
    position; rope_dim = 2 * cos.shape[1] may be smaller than D (the rest passes unchanged).
    `neox` rotates the two halves of the rotated span, otherwise adjacent pairs.
    """
    stride_qt, stride_qh = _head_strides(q, "q")
    stride_kt, stride_kh = _head_strides(k, "k") if k is not None else (0, 0)
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = 0 if k is None else k.shape[1]
    half = cos.shape[1]
    if k is not None and (k.shape[0] != n_tokens or k.shape[2] != head_dim or k.dtype != q.dtype):
        raise MetallicError(
            f"apply_rope: k {tuple(k.shape)} {k.dtype} does not go with q "
            f"{tuple(q.shape)} {q.dtype}"
        )
    if positions.shape != (n_tokens,):
        raise MetallicError(f"apply_rope: positions {tuple(positions.shape)} for {n_tokens} tokens")
    if sin.shape != cos.shape or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise MetallicError("apply_rope: cos and sin must be tables of one shape, rows contiguous")
    if not 0 < 2 * half <= head_dim:
        raise MetallicError(f"apply_rope: rope_dim {2 * half} does not fit head_dim {head_dim}")
    if n_tokens == 0:
        return
    n_heads = n_q_heads + n_k_heads
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(n_heads), max(1, 2048 // block_half))
    _rope_kernel[(n_tokens, triton.cdiv(n_heads, block_h))](
        q,
        k if k is not None else q,
        positions,
        cos,
        sin,
        n_q_heads,
        n_heads,
        half,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        cos.stride(0),
        NEOX=neox,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4,
        **pdl_launch(q.device),
    )


@triton.jit
def _norm_rope_kernel(
    q_ptr,
    k_ptr,
    q_w_ptr,
    k_w_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    n_q_heads,
    n_heads,
    half,
    head_dim,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_table,
    eps,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_ok = pairs < half
    rest = 2 * half + tl.arange(0, BLOCK_REST)
    rest_ok = rest < head_dim
    cos, sin, q_rows, is_q, k_rows, is_k = _token_heads(
        pos_ptr, cos_ptr, sin_ptr, pairs, pair_ok, n_q_heads, n_heads, stride_qt, stride_qh,
        stride_kt, stride_kh, stride_table, BLOCK_H,
    )  # fmt: skip
    _norm_rotate(q_ptr, q_rows, is_q, q_w_ptr, pairs, pair_ok, half, rest, rest_ok, head_dim,
                 cos, sin, eps)  # fmt: skip
    _norm_rotate(k_ptr, k_rows, is_k, k_w_ptr, pairs, pair_ok, half, rest, rest_ok, head_dim,
                 cos, sin, eps)  # fmt: skip


@triton.jit
def _norm_rotate(ptr, rows, row_ok, w_ptr, pairs, pair_ok, half, rest, rest_ok, head_dim, cos,
                 sin, eps):  # fmt: skip
    """RMS-normalize whole heads (f32, never rounded in between), then rotate the pairs
    (i, i + half) in place; the dims past 2 * half are only normalized."""
    pair_mask = row_ok[:, None] & pair_ok[None, :]
    rest_mask = row_ok[:, None] & rest_ok[None, :]
    a_ptrs = ptr + rows[:, None] + pairs[None, :]
    r_ptrs = ptr + rows[:, None] + rest[None, :]
    a = tl.load(a_ptrs, mask=pair_mask, other=0.0).to(tl.float32)
    b = tl.load(a_ptrs + half, mask=pair_mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptrs, mask=rest_mask, other=0.0).to(tl.float32)
    squares = tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1) + tl.sum(r * r, axis=1)
    inv_rms = (1.0 / tl.sqrt(squares / head_dim + eps))[:, None]
    a = a * inv_rms * tl.load(w_ptr + pairs, mask=pair_ok, other=0.0)[None, :]
    b = b * inv_rms * tl.load(w_ptr + half + pairs, mask=pair_ok, other=0.0)[None, :]
    r = r * inv_rms * tl.load(w_ptr + rest, mask=rest_ok, other=0.0)[None, :]
    dtype = ptr.dtype.element_ty
    tl.store(a_ptrs, (a * cos - b * sin).to(dtype), mask=pair_mask)
    tl.store(a_ptrs + half, (a * sin + b * cos).to(dtype), mask=pair_mask)
    tl.store(r_ptrs, r.to(dtype), mask=rest_mask)


def norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Per-head RMSNorm (QK-norm: `q_weight`, `k_weight` [D]) then NeoX RoPE, IN PLACE, in one
    launch for q [T, Hq, D] and k [T, Hkv, D]: the three launches of the unfused form cost more
    than their work in a decode step. Arguments otherwise as `apply_rope`."""
    stride_qt, stride_qh = _head_strides(q, "q")
    stride_kt, stride_kh = _head_strides(k, "k")
    n_tokens, n_q_heads, head_dim = q.shape
    half = cos.shape[1]
    if k.shape[0] != n_tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise MetallicError(f"norm_rope: k {tuple(k.shape)} does not go with q {tuple(q.shape)}")
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise MetallicError(f"norm_rope: norm weights must be [{head_dim}]")
    if positions.shape != (n_tokens,) or not 0 < 2 * half <= head_dim:
        raise MetallicError("norm_rope: positions or rope table do not fit q")
    if n_tokens == 0:
        return
    n_heads = n_q_heads + k.shape[1]
    block_half = triton.next_power_of_2(half)
    block_rest = triton.next_power_of_2(max(1, head_dim - 2 * half))
    block_h = min(triton.next_power_of_2(n_heads), max(1, 2048 // block_half))
    _norm_rope_kernel[(n_tokens, triton.cdiv(n_heads, block_h))](
        q,
        k,
        q_weight,
        k_weight,
        positions,
        cos,
        sin,
        n_q_heads,
        n_heads,
        half,
        head_dim,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        cos.stride(0),
        eps,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_REST=block_rest,
        num_warps=4,
        **pdl_launch(q.device),
    )
