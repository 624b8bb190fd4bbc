"""Lossless re-encoding of Q4_0 and Q5_0 blocks as Q8_0, so a stack of mixed formats is one.

Q4_0, Q5_0 and Q8_0 share a block: 32 elements and one f16 scale d, each value d times a small
signed integer (q - 8 for Q4_0's 4-bit q, q - 16 for Q5_0's 5-bit q, Q8_0's int8 q itself). Q8_0
holds every such integer, so a Q4_0 or Q5_0 block rewritten as Q8_0 (same d, the integers as
bytes) dequantizes to the same values bit for bit. The kernels launch once per format run of a
stacked matrix: Gemma 3 270M keeps q and k in Q5_0 and v in Q8_0 in half its layers, and its
one-row decode step is bound by launches, not bytes (q and k in Q8_0: 0.3 MB more a layer).
Larger stacks keep their formats: there a product's time is its bytes (Q4_0 would read 1.9x).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from metallic.quant.formats import block_format, tensor_nbytes

T = GGMLQuantizationType

WIDENS_TO_Q8_0 = (T.Q4_0, T.Q5_0)
# The largest stack widened. Gemma 3's products of 0.2-1.8 MB all took ~3.7 us on the H200 (a
# graph's kernel profile); 8 MB is where the dp4a kernels start to pay for rounding x
# (kernels.quant_gemv.DP4A_MIN_BYTES), i.e. where bytes begin to set a product's time.
MAX_WIDENED_BYTES = 8 << 20


def held_types(
    types: tuple[GGMLQuantizationType, ...], n_elements: int
) -> tuple[GGMLQuantizationType, ...]:
    """The formats a stack of matrices in `types` (`n_elements` in all) is kept in: all Q8_0
    where it mixes Q8_0 with Q4_0 or Q5_0 only and stays small in Q8_0 (one format, so one
    launch), else `types` themselves."""
    mixed = len(set(types)) > 1 and T.Q8_0 in types
    small = tensor_nbytes(T.Q8_0, n_elements) <= MAX_WIDENED_BYTES
    if mixed and small and all(t == T.Q8_0 or t in WIDENS_TO_Q8_0 for t in types):
        return (T.Q8_0,) * len(types)
    return types


def to_q8_0(raw: torch.Tensor, ggml_type: GGMLQuantizationType) -> torch.Tensor:
    """The Q8_0 bytes of `raw` (uint8 bytes of Q4_0 or Q5_0 blocks), on raw's device."""
    fmt = block_format(ggml_type)
    if ggml_type not in WIDENS_TO_Q8_0:
        raise ValueError(f"only {[t.name for t in WIDENS_TO_Q8_0]} widen to Q8_0, not {fmt.name}")
    blocks = raw.reshape(-1, fmt.type_size)
    if ggml_type == T.Q4_0:
        nibbles, offset, high = blocks[:, 2:18], 8, None
    else:
        nibbles, offset = blocks[:, 6:22], 16
        qh = blocks[:, 2:6].to(torch.int32)  # bit j of the little-endian word: element j
        word = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24
        high = (word[:, None] >> torch.arange(32, device=raw.device)) & 1
    q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=1).to(torch.int32)  # elements 0..15, 16..31
    if high is not None:
        q = q | high << 4
    out = torch.empty(blocks.shape[0], 34, dtype=torch.uint8, device=raw.device)
    out[:, :2] = blocks[:, :2]  # d
    out[:, 2:] = (q - offset).to(torch.int8).view(torch.uint8)
    return out.reshape(-1)
