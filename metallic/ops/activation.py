"""Gated MLP activations: SwiGLU (llama, qwen) and GeGLU with tanh-GELU (gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GGML_GELU_LIMIT = 10.0  # past it ggml's GELU returns 0 or x instead of its table


def gelu_tanh_f16_table(x: torch.Tensor) -> torch.Tensor:
    """GELU as ggml's CPU backend computes it: looked up in an f16 table at f16-rounded x."""
    looked_up = F.gelu(x.half().float(), approximate="tanh").half().to(x.dtype)
    outside = torch.where(x >= GGML_GELU_LIMIT, x, torch.zeros_like(x))
    return torch.where(x.abs() < GGML_GELU_LIMIT, looked_up, outside)


def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, kind: str, *, ggml_numerics: bool = False
) -> torch.Tensor:
    """`act(gate) * up` in one expression so a fused kernel can replace it on the GPU.

    `ggml_numerics` reproduces llama.cpp's CPU rounding (its f16 GELU table)."""
    if kind == "silu":
        return F.silu(gate) * up
    if kind == "gelu_tanh":
        act = gelu_tanh_f16_table(gate) if ggml_numerics else F.gelu(gate, approximate="tanh")
        return act * up
    raise ValueError(f"unknown activation {kind!r}")
