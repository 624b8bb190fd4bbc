"""RMSNorm over the last dimension, computed in float32 whatever the storage dtype."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / rms(x) * weight`; GGUF stores Gemma's (1 + w) already folded into `weight`."""
    xf = x.float()
    scaled = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (scaled * weight.float()).to(x.dtype)
