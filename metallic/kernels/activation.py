"""Gated MLP activation `act(gate) * up` as one Triton pass (SwiGLU, GeGLU with tanh-GELU).

Computes exactly `metallic.ops.activation.gated_activation` in f32. gate and up may be two tensors
or the two halves of one [T, 2F] projection output (gate first), read through strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metallic.errors import MetallicError
from metallic.kernels.pdl import pdl_launch, wait_for_inputs
from metallic.kernels.rounding import store_rounded_blocks

ACTIVATION_KINDS = {"silu": 0, "gelu_tanh": 1}
_BLOCK = 1024


@triton.jit
def _sigmoid(z):
    """1 / (1 + e^-z) through e^-|z|, which never overflows."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def gated_value(g, u, KIND: tl.constexpr):
    """act(g) * u in f32 for KIND 0 (SiLU) or 1 (tanh-GELU): the one formula of the kernels
    that apply it (this module's, and quant_matmul's [gate | up] products)."""
    if KIND == 0:
        act = g * _sigmoid(g)
    else:
        # 0.5 * (1 + tanh(y)) == sigmoid(2y): the tanh-GELU without a tanh or its cancellation.
        act = g * _sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    return act * u


@triton.jit
def _gated_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    xq_ptr,
    dx_ptr,
    xs_ptr,
    width,
    stride_gate,
    stride_up,
    KIND: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    y = gated_value(g, u, KIND).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * width + cols, y, mask=mask)
    if ROUND:  # width a multiple of 32: the row's int8 blocks for the dp4a product after
        b = tl.program_id(1) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        blocks = tl.reshape(y.to(tl.float32), (BLOCK // 32, 32))
        at = row * (width // 32) + b  # rows stacked, as quantize_x lays them out
        store_rounded_blocks(blocks, at, b < width // 32, xq_ptr, dx_ptr, xs_ptr)


def gated_activation(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    kind: str,
    rounded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """`act(gate) * up` for gate, up [..., F]; with `up=None`, gate is [..., 2F] = [gate | up].

    Returns a new [..., F] tensor of gate's dtype. kind is "silu" or "gelu_tanh". With `rounded`
    (buffers from `quant_gemv.empty_quantized_x` for the result's rows; F a multiple of 32), the
    result is also rounded into them as `quant_gemv.quantize_x` would, for the dp4a product that
    reads it.
    """
    if kind not in ACTIVATION_KINDS:
        raise MetallicError(
            f"unknown activation {kind!r} (expected one of {sorted(ACTIVATION_KINDS)})"
        )
    if up is None:
        if gate.shape[-1] % 2:
            raise MetallicError(f"gated_activation: odd fused width {gate.shape[-1]}")
        width = gate.shape[-1] // 2
        gate, up = gate[..., :width], gate[..., width:]
    width = gate.shape[-1]
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise MetallicError(
            f"gated_activation: up {tuple(up.shape)} {up.dtype} does not match gate "
            f"{tuple(gate.shape)} {gate.dtype}"
        )
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n_rows = out.numel() // width if width else 0
    if n_rows == 0:
        return out
    if rounded is not None and (width % 32 or rounded[0].numel() != n_rows * width):
        raise MetallicError(
            f"gated_activation: rows of a multiple of 32 round into buffers of as many, got "
            f"{n_rows}x{width} into {rounded[0].numel()}"
        )
    gate_2d, up_2d = _rows(gate, n_rows), _rows(up, n_rows)
    _gated_kernel[(n_rows, triton.cdiv(width, _BLOCK))](
        gate_2d,
        up_2d,
        out,
        *(rounded if rounded is not None else (out, out, out)),
        width,
        gate_2d.stride(0),
        up_2d.stride(0),
        KIND=ACTIVATION_KINDS[kind],
        ROUND=rounded is not None,
        BLOCK=_BLOCK,
        num_warps=4,
        **pdl_launch(out.device),
    )
    return out


def _rows(t: torch.Tensor, n_rows: int) -> torch.Tensor:
    """A [rows, F] view of t with a contiguous last dim; never a copy."""
    try:
        rows = t.view(n_rows, t.shape[-1])
    except RuntimeError:
        rows = None
    if rows is None or rows.stride(-1) != 1:
        raise MetallicError(
            f"gated_activation: {tuple(t.shape)} strides {t.stride()} is not a matrix of rows"
        )
    return rows
