"""The gather that reads embedding rows from host memory (in the interpreter: the GPU reads
pinned memory at its host address there, CPU tensors here): byte for byte the indexed rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.kernels import dequantize_gpu, gather_rows, prepare_weight
from metallic.kernels.host_rows import gather_host_rows
from metallic.kernels.packing import row_slice
from metallic.quant.quantize import quantize

T = GGMLQuantizationType
IDS = torch.tensor([5, 0, 5, 9, 3], dtype=torch.int32)  # repeats, out of order, the last row


@pytest.mark.parametrize(
    ("dtype", "width"),
    [(torch.int32, 300), (torch.float16, 7), (torch.int8, 13), (torch.float16, 600)],
)
def test_gathered_rows_are_the_indexed_rows(dtype: torch.dtype, width: int) -> None:
    """Whole words where the rows allow it, single bytes where not (7 f16 or 13 int8 values
    are no whole number of 4-byte words); rows longer than one program's block too."""
    raw = torch.randint(-128, 128, (10, width * dtype.itemsize), dtype=torch.int8)
    plane = raw.view(torch.uint8).view(dtype)
    got = gather_host_rows(plane, IDS)
    assert got.dtype == dtype and got.shape == (len(IDS), width)
    assert torch.equal(got.view(torch.uint8), plane[IDS.long()].view(torch.uint8))


def test_a_plane_at_an_odd_offset_is_read_by_bytes() -> None:
    """A plane whose first byte is not on a 4-byte word (a view inside a packed buffer)."""
    buffer = torch.randint(0, 256, (2 + 10 * 8,), dtype=torch.uint8)
    plane = buffer[2:].view(torch.float16).view(10, 4)  # 8-byte rows, starting at byte 2
    got = gather_host_rows(plane, IDS)  # compared as bytes: random bits may be NaN as f16
    assert torch.equal(got.view(torch.uint8), plane[IDS.long()].view(torch.uint8))


def test_no_ids_gather_nothing() -> None:
    plane = torch.zeros(10, 8, dtype=torch.int32)
    assert gather_host_rows(plane, IDS[:0]).shape == (0, 8)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0])
def test_gathered_blocks_dequantize_to_the_embedding_rows(qtype: GGMLQuantizationType) -> None:
    """Every plane of a packed matrix gathered from the host gives the rows `gather_rows`
    gives on the device (what the embedding lookup dequantizes)."""
    n, k = 12, 512
    values = np.random.default_rng(3).standard_normal((n, k)).astype(np.float32)
    weight = prepare_weight(torch.from_numpy(quantize(values, qtype).reshape(-1)), qtype, n, k)
    expected = gather_rows(weight, IDS)
    planes = [gather_host_rows(p, IDS) for p in weight.planes]
    for got, want in zip(planes, expected.planes, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    whole = dequantize_gpu(weight, qtype, n, k)
    assert torch.equal(dequantize_gpu(expected, qtype, len(IDS), k), whole[IDS.long()])


def test_a_row_slice_is_the_matrix_of_those_rows() -> None:
    n, k = 12, 256
    values = np.random.default_rng(4).standard_normal((n, k)).astype(np.float32)
    weight = prepare_weight(torch.from_numpy(quantize(values, T.Q6_K).reshape(-1)), T.Q6_K, n, k)
    part = row_slice(weight, 3, 8)
    assert (part.n, part.k) == (5, k)
    whole = dequantize_gpu(weight, T.Q6_K, n, k)
    assert torch.equal(dequantize_gpu(part, T.Q6_K, 5, k), whole[3:8])
