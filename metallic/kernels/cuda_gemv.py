"""One row of x times K-quant matrices through the CUDA C kernels (kernels/cuda/gemv.cu).

The same products as quant_gemv's dp4a kernels (x rounded by kernels/rounding.py, the same sums
per sub-block), written where Triton leaves no say: the first weights are loaded before the
wait on the previous kernel, weights bypass L1 so x stays there, and a block's warps split K so
no product needs a second launch to add split sums. Q4_K takes one part or two (gate and up in
one launch), Q6_K one. Chosen through ``quant_gemv.Geometry(kernel="cuda")``, or for every
one-row product they can take with METALLIC_CUDA_GEMV=1; benchmarks/gpu_cuda_gemv.py measures
them against the Triton kernels.
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

SOURCE = "gemv.cu"
MAX_WARPS = 8  # warps of a block, eight super-blocks each a turn
ROW_CHOICES = (1, 2, 4)  # rows of W a block
DEFAULT_ROWS = 2
# Turns of a lane (eight super-blocks a warp each): the set-up and the sums at the end cost
# about 110-150 instructions a lane, a turn 1.4-1.7 a weight for Q4_K and 1.9-2.4 for Q6_K at
# 1-4 rows (nvcc 13 for sm_90), so a lane should take more than one; two turns are in flight.
DEFAULT_TURNS = 2
_KERNELS = {T.Q4_K: "gemv_q4_k", T.Q6_K: "gemv_q6_k"}
_MAX_PARTS = {T.Q4_K: 2, T.Q6_K: 1}
_OUT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def block_warps(k: int, turns: int = DEFAULT_TURNS) -> int:
    """Warps a block takes for rows of K elements: `turns` turns of eight super-blocks each, as
    far as MAX_WARPS allows."""
    return max(1, min(MAX_WARPS, triton.cdiv(k // 256, 8 * turns)))


def _aligned(t: torch.Tensor, to: int) -> bool:
    return t.data_ptr() % to == 0


def takes(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    parts: Sequence[PackedWeight],
    m: int,
    rows: int = DEFAULT_ROWS,
) -> bool:
    """Whether the kernels can multiply m rows of x (rounded: quants, scales, half sums) by
    `parts` stacked, `rows` rows a block: one row of x; one Q6_K part, or one or two Q4_K parts
    of one K (the first of whole blocks); on a CUDA device; every plane where its vector loads
    can read it."""
    q, dx, xs = xq
    qtype = parts[0].ggml_type if parts else None
    return (
        m == 1
        and qtype in _KERNELS
        and 1 <= len(parts) <= _MAX_PARTS[qtype]
        and all(p.ggml_type == qtype and p.k == parts[0].k for p in parts)
        and (len(parts) == 1 or parts[0].n % rows == 0)
        and rows in ROW_CHOICES
        and q.device.type == "cuda"
        and all(_aligned(plane, 16) for p in parts for plane in p.planes[:3])
        and _aligned(q, 16)
        and _aligned(dx, 16)
        and _aligned(xs, 16)
    )


def enabled() -> bool:
    """Whether one-row products take these kernels by default: METALLIC_CUDA_GEMV=1, until
    benchmarks/gpu_cuda_gemv.py and an engine run (gpu_pdl.py --variable METALLIC_CUDA_GEMV)
    have measured them against the Triton kernels."""
    return os.environ.get("METALLIC_CUDA_GEMV") == "1"


def gemv(
    xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    parts: Sequence[PackedWeight],
    out: torch.Tensor,
    rows: int = DEFAULT_ROWS,
    warps: int | None = None,
) -> torch.Tensor:
    """out [1, N] = x (one row, rounded: quants, scales, half sums) times `parts` stacked (see
    `takes`), `rows` rows of W a block of `warps` warps (by default `block_warps`)."""
    if not takes(xq, parts, out.shape[0], rows):
        raise ValueError(
            f"cuda_gemv takes one row of x against one Q6_K part or one or two Q4_K parts of "
            f"one K on a CUDA device, 16-byte aligned, {ROW_CHOICES} rows a block: got "
            f"{out.shape[0]} rows on {xq[0].device}, {rows} a block, "
            f"{[(p.ggml_type.name, p.n, p.k) for p in parts]}"
        )
    q, dx, xs = xq
    qtype, n, k = parts[0].ggml_type, sum(p.n for p in parts), parts[0].k
    if out.shape[1] != n or out.stride(1) != 1 or out.dtype not in _OUT_KINDS or q.numel() != k:
        raise ValueError(f"cuda_gemv: out {list(out.shape)} {out.dtype} does not fit N = {n}")
    warps = warps or block_warps(k)
    if not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"cuda_gemv: {warps} warps a block, not 1..{MAX_WARPS}")
    kernel = nvrtc.kernel(
        SOURCE,
        _KERNELS[qtype],
        {"ROWS": rows, "WARPS": warps, "OUT_KIND": _OUT_KINDS[out.dtype]},
        q.device,
    )
    if qtype == T.Q4_K:
        first, second = parts[0].planes[0], parts[-1].planes[0]
        n_first = parts[0].n if len(parts) > 1 else n
        args = (first, second, q, dx, xs, out, n, n_first, k // 256)
    else:
        ql, qh, scales, d = parts[0].planes
        args = (ql, qh, scales, d, q, dx, xs, out, n, k // 256)
    kernel.launch((triton.cdiv(n, rows), 1, 1), (32 * warps, 1, 1), args)
    return out
