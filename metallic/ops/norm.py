"""RMSNorm over the last dimension, computed in float32 whatever the storage dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metallic.ops.dispatch import use_kernels


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pre_weight: torch.Tensor | None = None,
    rounded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """`x / rms(x) * weight`; GGUF stores Gemma's (1 + w) already folded into `weight`.

    With `residual`, first adds x into `residual` IN PLACE and normalizes the sum: a pre-norm
    block's residual add and norm in one pass over memory. The result is `out_dtype` (default:
    x's dtype, or the promotion of x's and residual's). With `pre_weight`, x is first replaced
    by its own norm times `pre_weight` in f32 (Gemma's post-norm of the block before).
    `rounded` (kernels only, see `ops.linear.rounding_buffers`): also round its rows into them
    for the dp4a products that read it."""
    if out_dtype is None:
        out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if use_kernels(x):
        from metallic.kernels.norm import rms_norm as kernel

        return kernel(
            x,
            weight,
            eps,
            residual=residual,
            out_dtype=out_dtype,
            pre_weight=pre_weight,
            rounded=rounded,
        )
    if pre_weight is not None:
        x = F.rms_norm(x.float(), (x.shape[-1],), pre_weight.float(), eps)
    if residual is not None:
        residual += x
        x = residual
    out = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return out.to(out_dtype)
