"""Gated MLP activations: SwiGLU (llama, qwen) and GeGLU with tanh-GELU (gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metallic.ops.dispatch import use_kernels


def gated_activation(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    kind: str,
    rounded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """`act(gate) * up`; with `up=None`, gate is the fused [..., 2F] = [gate | up] output of one
    stacked matmul, and the kernel reads both halves in place. `rounded` (kernels only, see
    `ops.linear.rounding_buffers`): also round its rows into them for the dp4a product."""
    if use_kernels(gate):
        from metallic.kernels.activation import gated_activation as kernel

        return kernel(gate, up, kind, rounded)
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    if kind == "silu":
        return F.silu(gate) * up
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {kind!r}")
