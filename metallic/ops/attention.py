"""Attention: over explicit key positions (torch), and over a paged KV cache (kernels on CUDA).

`attention` takes keys with their absolute positions, so one call serves a contiguous cache, a ring
buffer of the last W positions (sliding-window layers) and pages gathered from a paged cache.
`store_kv` and `paged_attention` read and write the paged pools through a step's block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metallic.ops.dispatch import use_kernels
from metallic.runtime.batch import StepBatch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [S, Hkv, D] -> [T, Hq, D]; key j is visible to query i when
    `k_pos[j] <= q_pos[i]` and, with a window W > 0, `q_pos[i] - k_pos[j] < W`.

    Query heads sharing a KV head are folded into that head's query rows, so GQA never copies
    keys or values."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    delta = q_positions[:, None] - k_positions[None, :]
    visible = delta >= 0
    if window:
        visible &= delta < window
    # [T, Hkv, group, D] -> [Hkv, group * T, D]: rows ordered (group member, token)
    qg = q.float().view(n_tokens, n_kv, group, head_dim).permute(1, 2, 0, 3)
    qg = qg.reshape(n_kv, group * n_tokens, head_dim)
    mask = visible.repeat(group, 1)
    out = F.scaled_dot_product_attention(
        qg, k.float().transpose(0, 1), v.float().transpose(0, 1), attn_mask=mask, scale=scale
    )
    out = out.view(n_kv, group, n_tokens, head_dim).permute(2, 0, 1, 3)
    return out.reshape(n_tokens, n_heads, head_dim).to(q.dtype)


@dataclass(frozen=True)
class KVWrite:
    """Where a layer's step values `v` [T, Hkv, D] and its keys (once rotated) go: the layer's
    pools, through `table` (one of the batch's block tables). `apply_rope` stores them."""

    v: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    batch: StepBatch
    table: torch.Tensor


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    batch: StepBatch,
    table: torch.Tensor,
) -> None:
    """Write a step's keys and values [T, Hkv, D] into pools [blocks, block_size, Hkv, D] at
    their positions, through `table` (one of the batch's block tables, [B, max_blocks])."""
    if use_kernels(k):
        from metallic.kernels.attention import store_kv as kernel

        kernel(
            k,
            v,
            k_pool,
            v_pool,
            table,
            batch.cu_seqlens_q,
            batch.positions,
            max_q_len=batch.max_q_len,
        )
        return
    slots = _pool_rows(batch, table, k_pool.shape[1])
    k_pool.view(-1, *k_pool.shape[2:])[slots] = k.to(k_pool.dtype)
    v_pool.view(-1, *v_pool.shape[2:])[slots] = v.to(v_pool.dtype)


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    batch: StepBatch,
    table: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    max_seq_len: int,
) -> torch.Tensor:
    """Each sequence's queries [T, Hq, D] over its keys in the paged pools (this step's already
    stored); `max_seq_len` bounds every sequence's length (sizes the decode split)."""
    if use_kernels(q):
        from metallic.kernels.attention import paged_attention_decode, paged_attention_prefill

        if batch.decode:
            return paged_attention_decode(
                q,
                k_pool,
                v_pool,
                table,
                batch.seq_lens,
                scale,
                window,
                max_seq_len=max_seq_len,
            )
        return paged_attention_prefill(
            q,
            k_pool,
            v_pool,
            table,
            batch.seq_lens,
            batch.cu_seqlens_q,
            batch.positions,
            scale,
            window,
            max_q_len=batch.max_q_len,
        )
    out = torch.empty_like(q)
    block_size = k_pool.shape[1]
    flat_k = k_pool.view(-1, *k_pool.shape[2:])
    flat_v = v_pool.view(-1, *v_pool.shape[2:])
    offset = 0
    for s, chunk in enumerate(batch.chunks):
        rows = slice(offset, offset + len(chunk.tokens))
        offset += len(chunk.tokens)
        end = chunk.start + len(chunk.tokens)
        key_pos = torch.arange(
            max(0, chunk.start - window + 1) if window else 0, end, device=q.device
        )
        row = table[s].long()
        slots = row[key_pos // block_size] * block_size + key_pos % block_size
        out[rows] = attention(
            q[rows], flat_k[slots], flat_v[slots], batch.positions[rows], key_pos, scale, window
        )
    return out


def _pool_rows(batch: StepBatch, table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat pool row of every token of the batch (torch path of `store_kv`)."""
    positions = batch.positions
    device = positions.device
    lengths = torch.tensor([len(c.tokens) for c in batch.chunks], device=device)
    seq_of_token = torch.repeat_interleave(torch.arange(len(batch.chunks), device=device), lengths)
    pos = positions.long()
    return table.long()[seq_of_token, pos // block_size] * block_size + pos % block_size
