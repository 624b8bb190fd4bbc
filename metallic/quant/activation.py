"""Activation rounding as ggml's CPU matrix products do it, for llama.cpp-identical numerics.

ggml never multiplies a quantized weight by a float activation: it first quantizes the activation
row to the weight format's partner ("vec_dot type": Q8_0 per 32 values for the legacy formats, Q8_K
per 256 for the K-quants, f16/bf16 for half-precision weights) and then takes exact integer dot
products. Rounding the activation the same way and then multiplying in f32 reproduces its results
up to summation order; this is what the `ggml` numerics mode does.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

T = GGMLQuantizationType

Q8_0_BLOCK = 32
Q8_K_BLOCK = 256

VEC_DOT_FORMAT: dict[GGMLQuantizationType, str] = {
    T.Q4_0: "q8_0",
    T.Q4_1: "q8_0",  # Q8_1 rounds the values exactly like Q8_0
    T.Q5_0: "q8_0",
    T.Q5_1: "q8_0",
    T.Q8_0: "q8_0",
    T.Q2_K: "q8_K",
    T.Q3_K: "q8_K",
    T.Q4_K: "q8_K",
    T.Q5_K: "q8_K",
    T.Q6_K: "q8_K",
    T.F16: "f16",
    T.BF16: "bf16",
}


def vec_dot_format(ggml_type: GGMLQuantizationType) -> str | None:
    """How ggml rounds activations multiplied by a weight of this type (None: not at all)."""
    return VEC_DOT_FORMAT.get(ggml_type)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """Per 32 values: d = amax/127 stored as f16, q = round(x/d) with d unrounded."""
    blocks = x.reshape(-1, Q8_0_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv)
    return (q * d.half().float()).reshape(x.shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """Per 256 values: the signed value of largest magnitude maps to -127, scale kept in f32."""
    blocks = x.reshape(-1, Q8_K_BLOCK)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    nonzero = peak != 0
    iscale = torch.where(nonzero, -127.0 / peak, torch.zeros_like(peak))
    q = torch.clamp(torch.round(iscale * blocks), max=127)
    d = torch.where(nonzero, 1.0 / iscale, torch.zeros_like(peak))
    return (q * d).reshape(x.shape)


def round_activation(x: torch.Tensor, fmt: str | None) -> torch.Tensor:
    """`x` (float32, last dim a multiple of the block) as ggml sees it in a product."""
    if fmt is None:
        return x
    if fmt == "q8_0":
        return _q8_0(x)
    if fmt == "q8_K":
        return _q8_k(x)
    if fmt == "f16":
        return x.half().float()
    if fmt == "bf16":
        return x.bfloat16().float()
    raise ValueError(f"unknown activation format {fmt!r}")
