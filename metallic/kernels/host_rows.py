"""Rows of a matrix kept in pinned host memory, gathered by the GPU itself.

Under a device budget the embedding matrix (282 MiB for Llama-3-8B in Q4_K) stays in host
memory: a step reads only its tokens' rows, a few KiB. The ids are on the device (a decode step's
inputs are the previous step's samples, never seen by the host), so the host cannot pick the rows
without waiting for the GPU. Instead a kernel reads them across PCIe: with unified addressing,
pinned host memory (`cudaHostAlloc`, what torch's `pin_memory` uses) is readable from kernels at
its host address. The copy is byte for byte: the rows are the ones the device copy would give.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metallic.kernels.pdl import pdl_launch, wait_for_inputs

BLOCK = 256  # words of a row per program


@triton.jit
def _gather_kernel(
    src_ptr, ids_ptr, out_ptr, row_words, src_stride, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < row_words
    source = tl.load(ids_ptr + row).to(tl.int64)
    words = tl.load(src_ptr + source * src_stride + cols, mask=ok)
    tl.store(out_ptr + row.to(tl.int64) * row_words + cols, words, mask=ok)


def gather_host_rows(plane: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (on the device) of `plane` ([n, width], rows contiguous, in pinned host
    memory), as a new [len(ids), width] tensor on the ids' device."""
    if plane.dim() != 2 or plane.stride(1) != 1:
        raise ValueError("gather_host_rows reads a 2-D matrix with contiguous rows")
    row_bytes = plane.shape[1] * plane.element_size()
    stride_bytes = plane.stride(0) * plane.element_size()
    offset_bytes = plane.storage_offset() * plane.element_size()
    aligned = row_bytes % 4 == 0 and stride_bytes % 4 == 0 and offset_bytes % 4 == 0
    word = torch.int32 if aligned else torch.uint8
    source = plane.view(torch.uint8).view(word)  # same bytes, read a word at a time
    out = torch.empty((ids.shape[0], source.shape[1]), dtype=word, device=ids.device)
    if ids.shape[0]:
        grid = (ids.shape[0], triton.cdiv(source.shape[1], BLOCK))
        _gather_kernel[grid](
            source,
            ids,
            out,
            source.shape[1],
            source.stride(0),
            BLOCK=BLOCK,
            **pdl_launch(out.device),
        )
    return out.view(torch.uint8).view(plane.dtype)
