"""Rotary position embeddings as one in-place Triton kernel over queries and keys together.

Computes exactly `metallic.ops.rope.apply_rope` (f32 math, the cos/sin of a `RopeTable`). Working
in place means the dims past rope_dim are never touched, and one launch serves q and k. Given a
`PagedWrite`, the same launch also stores the rotated keys and their values into a paged KV
cache, exactly as `kernels.attention.store_kv` would: a decode step saves that launch per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    v_ptr, k_pool_ptr, v_pool_ptr, block_table_ptr, cu_q_ptr, n_seqs, kv_dim, stride_vt,
    stride_vh, stride_block_table, stride_pb, stride_pt, stride_ph, block_size,
    NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    STORE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_ok = pairs < half
    cos, sin, q_rows, is_q, k_rows, is_k = _token_heads(
        pos_ptr, cos_ptr, sin_ptr, pairs, pair_ok, n_q_heads, n_heads, stride_qt, stride_qh,
        stride_kt, stride_kh, stride_table, BLOCK_H,
    )  # fmt: skip
    if STORE:
        slot = _kv_slot(pos_ptr, block_table_ptr, cu_q_ptr, n_seqs, stride_block_table, stride_pb,
                        stride_pt, block_size, BLOCK_S)  # fmt: skip
        v = _head_values(v_ptr, is_k, n_q_heads, kv_dim, stride_vt, stride_vh, BLOCK_H, BLOCK_D)
    if NEOX:  # pairs (i, i + half): two contiguous halves
        _rotate_halves(q_ptr, q_rows, is_q, pairs, pair_ok, half, cos, sin)
        _rotate_halves(k_ptr, k_rows, is_k, pairs, pair_ok, half, cos, sin)
    else:  # pairs (2i, 2i + 1): one contiguous load, split into its even and odd elements
        _rotate_adjacent(q_ptr, q_rows, is_q, half, cos, sin, BLOCK_HALF)
        _rotate_adjacent(k_ptr, k_rows, is_k, half, cos, sin, BLOCK_HALF)
    if STORE:
        _store_heads(k_ptr, k_rows, is_k, n_q_heads, slot, v, k_pool_ptr, v_pool_ptr, kv_dim,
                     stride_ph, BLOCK_H, BLOCK_D)  # fmt: skip


@triton.jit
def _kv_slot(pos_ptr, block_table_ptr, cu_q_ptr, n_seqs, stride_block_table, stride_pb, stride_pt,
             block_size, BLOCK_S: tl.constexpr):  # fmt: skip
    """The pool offset of this program's token: its position through its sequence's block
    table. Called before the rotation, so these dependent loads overlap it."""
    token = tl.program_id(0)
    # The token's sequence: how many sequences end at or before its row.
    seqs = tl.arange(0, BLOCK_S)
    ends = tl.load(cu_q_ptr + 1 + seqs, mask=seqs < n_seqs, other=0x7FFFFFFF)
    seq = tl.sum((ends <= token).to(tl.int32), axis=0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    block = tl.load(block_table_ptr + seq * stride_block_table + pos // block_size).to(tl.int64)
    return block * stride_pb + (pos % block_size) * stride_pt


@triton.jit
def _head_values(v_ptr, is_k, n_q_heads, kv_dim, stride_vt, stride_vh, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr):  # fmt: skip
    """The value heads that go with this program's key heads, loaded before the rotation."""
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    v_rows = tl.program_id(0).to(tl.int64) * stride_vt + (heads - n_q_heads) * stride_vh
    return tl.load(v_ptr + v_rows[:, None] + dims[None, :],
                   mask=is_k[:, None] & (dims < kv_dim)[None, :])  # fmt: skip


@triton.jit
def _store_heads(k_ptr, k_rows, is_k, n_q_heads, slot, v, k_pool_ptr, v_pool_ptr, kv_dim,
                 stride_ph, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Copy this program's key heads (as just rotated in place) and their value heads `v` into
    the pools at `slot` (`store_kv`'s layout)."""
    tl.debug_barrier()  # the rotated keys, written by every thread of the program, are visible
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = is_k[:, None] & (dims < kv_dim)[None, :]
    dst = slot + ((heads - n_q_heads) * stride_ph)[:, None] + dims[None, :]
    k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=mask)
    tl.store(k_pool_ptr + dst, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(v_pool_ptr + dst, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


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


@dataclass(frozen=True)
class PagedWrite:
    """Where a RoPE launch also stores the step's keys (as rotated) and values `v` [T, Hkv, D]:
    pools [n_blocks, block_size, Hkv, D] through `block_table` [B, max_blocks], token rows
    packed per sequence by `cu_seqlens_q` [B + 1], at the rotation's positions."""

    v: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor


def _store_args(k: torch.Tensor, write: PagedWrite | None) -> tuple[list, dict[str, object]]:
    """The kernels' store arguments and constexprs for `write` (dummies without one)."""
    if write is None:
        return [k, k, k, k, k, *[0] * 9], {"STORE": False, "BLOCK_S": 1, "BLOCK_D": 1}
    v, k_pool, v_pool, table = write.v, write.k_pool, write.v_pool, write.block_table
    if v.shape != k.shape or v.stride(-1) != 1:
        raise MetallicError(f"PagedWrite: v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if k_pool.dim() != 4 or k_pool.shape[2:] != k.shape[1:] or v_pool.shape != k_pool.shape:
        raise MetallicError(
            f"PagedWrite: pools {tuple(k_pool.shape)} do not hold keys of shape "
            f"{tuple(k.shape[1:])}"
        )
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1 or table.stride(-1) != 1:
        raise MetallicError("PagedWrite: pools of one layout, contiguous rows, are needed")
    n_seqs = table.shape[0]
    if write.cu_seqlens_q.shape != (n_seqs + 1,):
        raise MetallicError(f"PagedWrite: cu_seqlens_q does not describe {n_seqs} sequences")
    args = [v, k_pool, v_pool, table, write.cu_seqlens_q, n_seqs, k.shape[2], v.stride(0)]
    args += [v.stride(1), table.stride(0), *k_pool.stride()[:3], k_pool.shape[1]]
    constants = {"STORE": True, "BLOCK_S": triton.next_power_of_2(max(n_seqs, 1))}
    return args, constants | {"BLOCK_D": triton.next_power_of_2(k.shape[2])}


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
    write: PagedWrite | None = None,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (or None) IN PLACE by each token's position.

    cos/sin are a `RopeTable`'s [P, rope_dim / 2] f32 tables, already grown past the largest
    position; rope_dim = 2 * cos.shape[1] may be smaller than D (the rest passes unchanged).
    `neox` rotates the two halves of the rotated span, otherwise adjacent pairs. `write` (with
    k) also stores the rotated keys and the values into a paged cache.
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
    if write is not None and k is None:
        raise MetallicError("apply_rope: a PagedWrite stores keys, but k is None")
    if n_tokens == 0:
        return
    store_args, store_constants = _store_args(k if k is not None else q, write)
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
        *store_args,
        NEOX=neox,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        **store_constants,
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
    v_ptr, k_pool_ptr, v_pool_ptr, block_table_ptr, cu_q_ptr, n_seqs, kv_dim, stride_vt,
    stride_vh, stride_block_table, stride_pb, stride_pt, stride_ph, block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    STORE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_ok = pairs < half
    rest = 2 * half + tl.arange(0, BLOCK_REST)
    rest_ok = rest < head_dim
    cos, sin, q_rows, is_q, k_rows, is_k = _token_heads(
        pos_ptr, cos_ptr, sin_ptr, pairs, pair_ok, n_q_heads, n_heads, stride_qt, stride_qh,
        stride_kt, stride_kh, stride_table, BLOCK_H,
    )  # fmt: skip
    if STORE:
        slot = _kv_slot(pos_ptr, block_table_ptr, cu_q_ptr, n_seqs, stride_block_table, stride_pb,
                        stride_pt, block_size, BLOCK_S)  # fmt: skip
        v = _head_values(v_ptr, is_k, n_q_heads, kv_dim, stride_vt, stride_vh, BLOCK_H, BLOCK_D)
    _norm_rotate(q_ptr, q_rows, is_q, q_w_ptr, pairs, pair_ok, half, rest, rest_ok, head_dim,
                 cos, sin, eps)  # fmt: skip
    _norm_rotate(k_ptr, k_rows, is_k, k_w_ptr, pairs, pair_ok, half, rest, rest_ok, head_dim,
                 cos, sin, eps)  # fmt: skip
    if STORE:
        _store_heads(k_ptr, k_rows, is_k, n_q_heads, slot, v, k_pool_ptr, v_pool_ptr, kv_dim,
                     stride_ph, BLOCK_H, BLOCK_D)  # fmt: skip


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
    write: PagedWrite | None = None,
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
    store_args, store_constants = _store_args(k, write)
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
        *store_args,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_REST=block_rest,
        **store_constants,
        num_warps=4,
        **pdl_launch(q.device),
    )
