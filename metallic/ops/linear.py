"""Matrix products against weights kept as the device prefers them.

On the CPU a weight is dequantized once at load into a compact dense dtype (the PyTorch path); on
CUDA it stays in its ggml blocks and a Triton kernel dequantizes in registers. Matrices that share
an input (q|k|v, gate|up) are stacked into one so a step makes one pass instead of several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType


@dataclass
class LinearWeight:
    """A dense [out, in] matrix, possibly several stacked row blocks ("parts"), plus bias.

    Each part remembers its ggml type (the GPU path reads blocks per part)."""

    dense: torch.Tensor  # [out, in] in the compute dtype
    ggml_types: tuple[GGMLQuantizationType, ...]
    part_rows: tuple[int, ...]
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.dense.shape[0]

    @property
    def in_features(self) -> int:
        return self.dense.shape[1]


def stack(parts: Sequence[LinearWeight]) -> LinearWeight:
    """One weight computing every part's output side by side (a copy, made once at load)."""
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("cannot stack weights where only some have a bias")
    return LinearWeight(
        dense=torch.cat([p.dense for p in parts]),
        ggml_types=sum((p.ggml_types for p in parts), ()),
        part_rows=sum((p.part_rows for p in parts), ()),
        bias=None if biases[0] is None else torch.cat(biases),  # type: ignore[arg-type]
    )


def linear(x: torch.Tensor, weight: LinearWeight) -> torch.Tensor:
    """`x @ W.T + b` with x [..., in]; the result keeps x's dtype."""
    out = F.linear(x.to(weight.dense.dtype), weight.dense)
    if weight.bias is not None:
        out = out + weight.bias.to(out.dtype)
    return out.to(x.dtype)
