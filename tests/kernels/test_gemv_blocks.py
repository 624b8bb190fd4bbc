"""The dp4a block-format decode kernels (metallic.kernels.gemv_blocks) in the interpreter.

The oracle is gguf's own numpy dequantizer (written by the ggml authors, not here) on random
block bytes, every bit pattern of the quants possible, times x *as rounded to int8* in float64:
what the kernel computes, so only float summation order differs. Seeds are fresh each run and
in messages.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from metallic.errors import MetallicError
from metallic.kernels import prepare_weight
from metallic.kernels.gemv_blocks import Geometry, block_gemv
from metallic.kernels.quant_gemv import quantize_x
from metallic.quant.formats import block_format

T = GGMLQuantizationType
FORMATS = (T.Q8_0, T.Q5_0, T.Q4_0)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _matrix(qtype: GGMLQuantizationType, n: int, k: int, gen: torch.Generator):
    """Random blocks (scale d first in each block, about 1e-3 as in real nets), packed, and
    their dequantized matrix in float64."""
    fmt = block_format(qtype)
    blocks = torch.randint(0, 256, (n * k // 32, fmt.type_size), dtype=torch.uint8, generator=gen)
    d = (torch.rand(blocks.shape[0], generator=gen) * 2e-3 + 1e-4).to(torch.float16)
    blocks[:, :2] = d.view(torch.uint8).view(-1, 2)
    raw = blocks.view(-1)
    dense = gguf_dequantize(raw.numpy(), qtype).reshape(n, k).astype(np.float64)
    return prepare_weight(raw, qtype, n, k), torch.from_numpy(dense)


def _x(m: int, k: int, gen: torch.Generator):
    """x [m, k] rounded as block_gemv takes it, and the rounded values in float64."""
    xq = quantize_x(torch.randn(m, k, generator=gen).reshape(-1))
    rounded = (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(m, k)
    return xq, rounded


def _relative(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matches_float64_at_gemma_width(qtype: GGMLQuantizationType, m: int) -> None:
    """K = 640 (Gemma 3 270M), odd N, the default geometry (K split across programs)."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    weight, dense = _matrix(qtype, 21, 640, gen)
    xq, rounded = _x(m, 640, gen)
    out = block_gemv(xq, weight, torch.empty(m, 21))
    assert _relative(out, rounded @ dense.T) < 1e-5, seed


@pytest.mark.parametrize(("m", "blocks_first"), [(2, True), (5, False)])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_steps_splits_and_a_column_slice(
    qtype: GGMLQuantizationType, m: int, blocks_first: bool
) -> None:
    """Several loop steps in each of two splits, into columns 3..3+N of a wider bf16 output,
    with tiles in either order."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    n, k = 13, 1024
    weight, dense = _matrix(qtype, n, k, gen)
    xq, rounded = _x(m, k, gen)
    wide = torch.full((m, n + 7), 7.0, dtype=torch.bfloat16)
    block_gemv(xq, weight, wide[:, 3 : 3 + n], Geometry(8, 2, 2, 1, blocks_first))
    assert _relative(wide[:, 3 : 3 + n], rounded @ dense.T) < 1e-2, seed
    assert (wide[:, :3] == 7).all() and (wide[:, 3 + n :] == 7).all(), seed


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(qtype: GGMLQuantizationType) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    n, k = 19, 640
    weight, _ = _matrix(qtype, n, k, gen)
    x = torch.randn(8, k, generator=gen)
    batch = block_gemv(quantize_x(x.reshape(-1)), weight, torch.empty(8, n))
    for r in (0, 6):
        alone = block_gemv(quantize_x(x[r]), weight, torch.empty(1, n))
        assert torch.equal(alone[0], batch[r]), (seed, r)


def test_rejects_other_formats_and_too_many_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, _ = _matrix(T.Q8_0, 4, 64, gen)
    with pytest.raises(MetallicError, match="1 to 8 rows"):
        block_gemv(quantize_x(torch.randn(9 * 64)), weight, torch.empty(9, 4))
    with pytest.raises(MetallicError, match="1 to 8 rows"):
        block_gemv(quantize_x(torch.randn(2 * 64)), weight, torch.empty(1, 4))
    raw = torch.zeros(4 * 144, dtype=torch.uint8)
    with pytest.raises(MetallicError, match="Q4_K"):
        block_gemv(quantize_x(torch.randn(256)), prepare_weight(raw, T.Q4_K, 4, 256),
                   torch.empty(1, 4))  # fmt: skip
