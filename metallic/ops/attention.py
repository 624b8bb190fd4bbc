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
    `k_pos[j] <= q_pos[i]` and, with a window W > 0, `q_pos[i] - k_pos[j] < W`."""
    n_rep = q.shape[1] // k.shape[1]
    delta = q_positions[:, None] - k_positions[None, :]
    visible = delta >= 0
    if window:
        visible &= delta < window
    qh = q.transpose(0, 1).float()
    kh = k.transpose(0, 1).float()
    vh = v.transpose(0, 1).float()
    if n_rep > 1:
        kh = kh.repeat_interleave(n_rep, dim=0)
        vh = vh.repeat_interleave(n_rep, dim=0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible, scale=scale)
    return out.transpose(0, 1).to(q.dtype)
