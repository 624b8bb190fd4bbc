"""RMSNorm as one Triton kernel, optionally fused with the residual add that precedes it.

Computes exactly `metallic.ops.norm.rms_norm` (f32 math over the last dim). Rows are addressed
through (token, head) strides so a per-head QK-norm runs on a strided [T, H, D] view without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metallic.errors import MetallicError
from metallic.kernels.pdl import pdl_launch, wait_for_inputs
from metallic.kernels.rounding import store_rounded_blocks

_MAX_DIM = 16384  # one row lives in registers; wider rows are not a shape any supported model has


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    out_ptr,
    w_ptr,
    pre_ptr,
    xq_ptr,
    dx_ptr,
    xs_ptr,
    n_rows,
    n_heads,
    dim,
    stride_xt,
    stride_xh,
    stride_rt,
    stride_rh,
    eps,
    HAS_PRE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    token = rows // n_heads
    head = rows % n_heads
    x_offs = (token * stride_xt + head * stride_xh)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:  # normalize x itself first (Gemma's post-norm of a block's output)
        pre = tl.load(pre_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = x / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)[:, None] * pre[None, :]
    if HAS_RESIDUAL:
        r_offs = (token * stride_rt + head * stride_rh)[:, None] + cols[None, :]
        summed = x + tl.load(res_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
        # Normalize the value as stored, so fused and unfused paths agree bit for bit.
        stored = summed.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + r_offs, stored, mask=mask)
        x = stored.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = x * inv_rms[:, None] * w[None, :]
    out_offs = rows[:, None] * dim + cols[None, :]
    stored_y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, stored_y, mask=mask)
    if ROUND:  # a row a program (BLOCK_R 1), dim a multiple of 32: int8 blocks for dp4a products
        blocks = tl.reshape(stored_y.to(tl.float32), (BLOCK_D // 32, 32))
        b = tl.arange(0, BLOCK_D // 32)
        at = tl.program_id(0) * (dim // 32) + b  # rows stacked, as quantize_x lays them out
        store_rounded_blocks(blocks, at, b < dim // 32, xq_ptr, dx_ptr, xs_ptr)


def _row_strides(t: torch.Tensor, name: str) -> tuple[int, int]:
    """(token, head) strides of a [T, D] or [T, H, D] tensor whose last dim is contiguous."""
    if t.dim() not in (2, 3) or t.stride(-1) != 1:
        raise MetallicError(
            f"rms_norm: {name} must be [T, D] or [T, H, D] with a contiguous last dim, "
            f"got shape {tuple(t.shape)} strides {t.stride()}"
        )
    return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pre_weight: torch.Tensor | None = None,
    rounded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """`norm(x) * weight` over the last dim of x [T, D] or [T, H, D]; returns a new tensor.

    With `residual`, first forms `s = x + residual`, writes s into `residual` in place (in
    residual's dtype) and returns `norm(s)` in `promote_types(x, residual)`: the add and the norm
    of a pre-norm block in one pass over memory. `out_dtype` overrides the result's dtype.
    With `pre_weight`, x is first replaced by `norm(x) * pre_weight` (in f32, unrounded): a
    post-norm, the residual add and the next pre-norm in one kernel.
    With `rounded` (buffers from `empty_quantized_x` for x's rows; D a multiple of 32), the
    result is also rounded into them as `quant_gemv.quantize_x` would: a decode step's norm then
    feeds the dp4a products without a rounding launch of their own.
    """
    dim = x.shape[-1]
    if weight.shape != (dim,) or (pre_weight is not None and pre_weight.shape != (dim,)):
        raise MetallicError(f"rms_norm: weight {tuple(weight.shape)} does not match dim {dim}")
    if dim > _MAX_DIM:
        raise MetallicError(f"rms_norm: rows of {dim} exceed the supported {_MAX_DIM}")
    stride_xt, stride_xh = _row_strides(x, "x")
    promoted = x.dtype
    stride_rt, stride_rh = 0, 0
    if residual is not None:
        if residual.shape != x.shape:
            raise MetallicError(
                f"rms_norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}"
            )
        stride_rt, stride_rh = _row_strides(residual, "residual")
        promoted = torch.promote_types(x.dtype, residual.dtype)
    out_dtype = out_dtype or promoted
    n_heads = x.shape[1] if x.dim() == 3 else 1
    n_rows = x.shape[0] * n_heads
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if n_rows == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(16, 2048 // block_d))
    if rounded is not None:
        if dim % 32 or rounded[0].numel() != n_rows * dim:
            raise MetallicError(
                f"rms_norm: rows of a multiple of 32 round into buffers of as many, got "
                f"{n_rows}x{dim} into {rounded[0].numel()}"
            )
        block_r = 1
    num_warps = 4 if block_d * block_r <= 4096 else 8
    _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
        x,
        residual if residual is not None else x,
        out,
        weight,
        pre_weight if pre_weight is not None else weight,
        *(rounded if rounded is not None else (out, out, out)),
        n_rows,
        n_heads,
        dim,
        stride_xt,
        stride_xh,
        stride_rt,
        stride_rh,
        eps,
        HAS_PRE=pre_weight is not None,
        HAS_RESIDUAL=residual is not None,
        ROUND=rounded is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
        **pdl_launch(x.device),
    )
    return out
