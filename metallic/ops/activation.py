"""Gated MLP activations: SwiGLU (llama, qwen) and GeGLU with tanh-GELU (gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """`act(gate) * up` in one expression so a fused kernel can replace it on the GPU."""
    if kind == "silu":
        return F.silu(gate) * up
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {kind!r}")
