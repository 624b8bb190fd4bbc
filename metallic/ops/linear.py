"""Matrix products against weights kept as the device prefers them.

On the CPU a weight is dequantized once at load into a compact dense dtype (the PyTorch path); on
CUDA it stays in its ggml blocks and a Triton kernel dequantizes in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from metallic.quant.activation import round_activation


@dataclass
class LinearWeight:
    """A [out_features, in_features] matrix plus optional bias, in the device's chosen form."""

    out_features: int
    in_features: int
    ggml_type: GGMLQuantizationType
    dense: torch.Tensor  # [out, in] in the compute dtype
    bias: torch.Tensor | None = None
    activation_format: str | None = None  # round x as ggml would (see quant.activation)

    @property
    def nbytes(self) -> int:
        extra = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.dense.numel() * self.dense.element_size() + extra


def linear(x: torch.Tensor, weight: LinearWeight) -> torch.Tensor:
    """`x @ W.T + b` with x [..., in]; the result keeps x's dtype."""
    w = weight.dense
    if weight.activation_format is not None:
        x = round_activation(x.float(), weight.activation_format)
    out = F.linear(x.to(w.dtype), w)
    if weight.bias is not None:
        out = out + weight.bias.to(out.dtype)
    return out.to(x.dtype)
