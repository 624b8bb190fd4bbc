"""Quantizer round trips: gguf-py decodes our blocks close to the input; ours decodes the same."""

from __future__ import annotations

import os
import random

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from metallic.errors import UnsupportedTensorType
from metallic.quant import FORMATS, dequantize, quantize

SEED = int(os.environ.get("METALLIC_QUANT_SEED", random.randrange(2**32)))

# Worst relative RMS error of a 4096-wide row of normal data, about 10% above the worst of
# 480 measured rows (Q8_0 0.0056, Q6_K 0.0190, Q5_K 0.0387, Q4_K 0.0770, Q3_K 0.153,
# Q2_K 0.285); a broken encoder lands far above.
MAX_REL_RMS = {
    T.F32: 0.0,
    T.F16: 0.0005,
    T.BF16: 0.0035,
    T.Q4_0: 0.10,
    T.Q4_1: 0.09,
    T.Q5_0: 0.05,
    T.Q5_1: 0.044,
    T.Q8_0: 0.0065,
    T.Q2_K: 0.31,
    T.Q3_K: 0.165,
    T.Q4_K: 0.084,
    T.Q5_K: 0.042,
    T.Q6_K: 0.021,
}


def test_every_format_has_a_bound() -> None:
    assert set(MAX_REL_RMS) == set(FORMATS)


def decode(blocks: np.ndarray, qtype: T) -> np.ndarray:
    """gguf-py's decoding of our blocks, after checking ours decodes them to the same bits."""
    ref = np.asarray(gguf.quants.dequantize(blocks, qtype), dtype=np.float32)
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1)), qtype).numpy()
    assert np.array_equal(ours.view(np.int32), ref.reshape(-1).view(np.int32)), qtype.name
    return ref


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_round_trip_error(qtype: T) -> None:
    rng = np.random.default_rng([SEED, qtype.value])
    # Rows span four orders of magnitude so a mishandled scale shows up as a bad row. Much
    # smaller rows push the f16 super-block scales of Q8_0/Q6_K into subnormals, which costs
    # precision in any encoder.
    row_scale = 10.0 ** rng.uniform(-2, 2, (8, 1))
    values = (rng.standard_normal((8, 4096)) * row_scale).astype(np.float32)
    blocks = quantize(values, qtype)
    fmt = FORMATS[qtype]
    assert blocks.dtype == np.uint8
    assert blocks.shape == (8, 4096 // fmt.block_size * fmt.type_size)
    got = decode(blocks, qtype)
    assert got.shape == values.shape and np.isfinite(got).all()
    rel = np.sqrt(((got - values) ** 2).mean(axis=1) / (values**2).mean(axis=1))
    assert rel.max() <= MAX_REL_RMS[qtype], f"{fmt.name} seed={SEED}: relative RMS {rel}"


K_AND_LEGACY = [t for t in FORMATS if FORMATS[t].block_size > 1]


@pytest.mark.parametrize("qtype", K_AND_LEGACY, ids=lambda t: t.name)
def test_degenerate_blocks(qtype: T) -> None:
    """Zero, constant, one-signed and single-spike blocks stay finite and close."""
    n = FORMATS[qtype].block_size
    ramp = np.linspace(0.5, 3.0, n, dtype=np.float32)
    spike = np.zeros(n, dtype=np.float32)
    spike[n // 3] = -7.0
    rows = np.stack([np.zeros(n), np.full(n, 0.25), ramp, -ramp, spike]).astype(np.float32)
    got = decode(quantize(rows, qtype), qtype).reshape(rows.shape)
    assert np.isfinite(got).all()
    assert np.array_equal(got[0], rows[0]), "zeros must decode to zeros"
    # Half of the widest spacing any of these formats may use (Q2_K: 4 levels, 4-bit scales).
    tolerance = 0.5 * np.abs(rows).max(axis=1, keepdims=True) / 3 * 1.2 + 1e-6
    assert (np.abs(got - rows) <= tolerance).all(), f"{qtype.name}: {got - rows}"


def test_leading_dims_and_no_aliasing() -> None:
    values = np.arange(2 * 3 * 256, dtype=np.float32).reshape(2, 3, 256) / 100
    assert quantize(values, T.Q4_K).shape == (2, 3, 144)
    assert quantize(values, T.Q8_0).shape == (2, 3, 8 * 34)
    raw = quantize(values, T.F32)
    assert raw.shape == (2, 3, 1024) and raw.dtype == np.uint8
    raw[...] = 0
    assert values[0, 0, 1] == np.float32(0.01), "F32 output must not alias the input"


def test_bad_input_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 128), dtype=np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.float32(1.0), T.Q8_0)
    with pytest.raises(UnsupportedTensorType, match="IQ2_XXS"):
        quantize(np.zeros(256, dtype=np.float32), T.IQ2_XXS)
