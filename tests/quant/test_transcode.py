"""Q4_0/Q5_0 blocks rewritten as Q8_0 dequantize, by gguf-py's own numpy code, to the same bits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from metallic.quant.transcode import held_types, to_q8_0


def _random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scales = rng.standard_normal(n_blocks).astype(np.float16)  # finite, like a real file's
    scales[:3] = (0.0, -0.0, np.float16(6e-8))  # zero and a subnormal
    blocks[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0])
def test_widened_blocks_dequantize_to_the_same_bits(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    raw = _random_blocks(qtype, 512, rng)
    widened = to_q8_0(torch.from_numpy(raw), qtype).numpy()
    assert widened.size == 512 * 34
    expected = gguf.quants.dequantize(raw, qtype)
    got = gguf.quants.dequantize(widened, T.Q8_0)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_widening_rejects_other_formats() -> None:
    with pytest.raises(ValueError, match="widen to Q8_0"):
        to_q8_0(torch.zeros(34, dtype=torch.uint8), T.Q8_0)


def test_held_types_widen_only_a_small_mixed_stack_of_legacy_blocks() -> None:
    gemma_qkv = (1024 + 256 + 256) * 640  # Gemma 3 270M's q|k|v: 1 MB in Q8_0
    assert held_types((T.Q5_0, T.Q5_0, T.Q8_0), gemma_qkv) == (T.Q8_0,) * 3
    assert held_types((T.Q4_0, T.Q8_0), gemma_qkv) == (T.Q8_0, T.Q8_0)
    assert held_types((T.Q5_0,) * 3, gemma_qkv) == (T.Q5_0,) * 3  # one format already
    assert held_types((T.Q4_K, T.Q4_K, T.Q6_K), gemma_qkv) == (T.Q4_K, T.Q4_K, T.Q6_K)
    mixed = (T.Q5_0, T.Q4_K, T.Q8_0)  # not only legacy blocks
    assert held_types(mixed, gemma_qkv) == mixed
    llama_8b_qkv = (4096 + 1024 + 1024) * 4096  # 27 MB in Q8_0: bytes set its product's time
    assert held_types((T.Q4_0, T.Q4_0, T.Q8_0), llama_8b_qkv) == (T.Q4_0, T.Q4_0, T.Q8_0)
