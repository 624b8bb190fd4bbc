"""Scaled dot-product attention over explicit positions (causal, sliding window, GQA).

Keys carry their absolute positions, so the same call serves a contiguous cache, a ring buffer of
the last W positions (sliding-window layers) and, later, pages gathered from a paged cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
