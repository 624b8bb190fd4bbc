"""Model-facing operations with one signature each: Triton kernels on CUDA, PyTorch elsewhere."""

from metallic.ops.activation import gated_activation
from metallic.ops.attention import attention
from metallic.ops.linear import LinearWeight, embed, linear
from metallic.ops.norm import rms_norm
from metallic.ops.rope import RopeTable, apply_rope

__all__ = [
    "LinearWeight",
    "RopeTable",
    "apply_rope",
    "attention",
    "embed",
    "gated_activation",
    "linear",
    "rms_norm",
]
