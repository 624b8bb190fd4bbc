"""One row of x times Q4_K matrices through the CUDA C kernel (kernels/cuda/gemv_q4_k.cu).

The same product as quant_gemv's dp4a kernels (x rounded by kernels/rounding.py, the same sums
per sub-block), written where Triton leaves no say: the first weights are loaded before the
wait on the previous kernel, weights bypass L1 so x stays there, and a block's warps split K so
no product needs a second launch to add split sums. Chosen through
``quant_gemv.Geometry(kernel="cuda")``, or for every one-row Q4_K product it can take with
METALLIC_CUDA_GEMV=1; benchmarks/gpu_cuda_gemv.py measures it against the Triton kernels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
from gguf import GGMLQuantizationType

from metallic.kernels import nvrtc
from metallic.kernels.packing import PackedWeight

T = GGMLQuantizationType

SOURCE = "gemv_q4_k.cu"
MAX_WARPS = 8  # warps of a block, eight super-blocks each a turn
ROW_CHOICES = (1, 2, 4)  # rows of W a block
DEFAULT_ROWS = 2
_OUT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def block_warps(k: int) -> int:
    """Warps a block takes for rows of K elements: one turn of eight super-blocks each, as far
    as MAX_WARPS allows."""
    return max(1, min(MAX_WARPS, triton.cdiv(k // 256, 8)))


def takes(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    parts: Sequence[PackedWeight],
    m: int,
    rows: int,
) -> bool:
    """Whether the kernel can multiply m rows of x (rounded: quants, scales, half sums) by
    `parts` stacked, `rows` rows a block: one row of x, Q4_K parts of one K (two at most, the
    first of whole blocks), on a CUDA device, every plane where its vector loads can read it."""
    q, dx, xs = xq
    return (
        m == 1
        and 1 <= len(parts) <= 2
        and all(p.ggml_type == T.Q4_K and p.k == parts[0].k for p in parts)
        and (len(parts) == 1 or parts[0].n % rows == 0)
        and rows in ROW_CHOICES
        and q.device.type == "cuda"
        and all(p.planes[0].data_ptr() % 16 == 0 for p in parts)
        and q.data_ptr() % 16 == 0
        and dx.data_ptr() % 8 == 0
        and xs.data_ptr() % 16 == 0
    )


def enabled() -> bool:
    """Whether one-row Q4_K products take this kernel by default: METALLIC_CUDA_GEMV=1, until
    benchmarks/gpu_cuda_gemv.py and an engine run have measured it against the Triton kernels."""
    return os.environ.get("METALLIC_CUDA_GEMV") == "1"


def gemv_q4_k(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    parts: Sequence[PackedWeight],
    out: torch.Tensor,
    rows: int = DEFAULT_ROWS,
) -> torch.Tensor:
    """out [1, N] = x (one row, rounded: quants, scales, half sums) times the Q4_K `parts`
    stacked (gate and up in one launch), `rows` rows of W a block."""
    if not takes(xq, parts, out.shape[0], rows):
        raise ValueError(
            f"gemv_q4_k takes one row of x against one or two Q4_K parts of one K on a CUDA "
            f"device, 16-byte aligned, {ROW_CHOICES} rows a block: got {out.shape[0]} rows on "
            f"{xq[0].device}, {rows} a block, {[(p.ggml_type.name, p.n, p.k) for p in parts]}"
        )
    q, dx, xs = xq
    n, k = sum(p.n for p in parts), parts[0].k
    if out.shape[1] != n or out.stride(1) != 1 or out.dtype not in _OUT_KINDS or q.numel() != k:
        raise ValueError(f"gemv_q4_k: out {list(out.shape)} {out.dtype} does not fit N = {n}")
    warps = block_warps(k)
    kernel = nvrtc.kernel(
        SOURCE,
        "gemv_q4_k",
        {"ROWS": rows, "WARPS": warps, "OUT_KIND": _OUT_KINDS[out.dtype]},
        q.device,
    )
    first = parts[0].planes[0]
    second = parts[-1].planes[0]
    kernel.launch(
        (triton.cdiv(n, rows), 1, 1),
        (32 * warps, 1, 1),
        (first, second, q, dx, xs, out, n, parts[0].n if len(parts) > 1 else n, k // 256),
    )
    return out
