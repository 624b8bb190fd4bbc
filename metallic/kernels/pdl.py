"""Programmatic dependent launch (sm90+): a kernel's launch overlaps the tail of the one before.

A decode step is hundreds of small kernels, each paying a launch and a ramp-up of a few µs in
which the GPU does no work. Launched with PDL, a kernel's programs may be scheduled while its
predecessor still runs; they wait in ``wait_for_inputs`` until the predecessor has finished and
its writes are visible, so the launch latency is hidden and the result is unchanged.

The convention for every Triton kernel on the decode path: take ``PDL: tl.constexpr``, call
``wait_for_inputs(PDL)`` before its first load or store, and launch with ``**pdl_launch(device)``
(which also sets PDL). A kernel launched with PDL must not touch global memory before that wait:
its predecessor may still be reading what it would overwrite.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_CAPABLE: dict[int, bool] = {}


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA sm90 or newer, not under the
    interpreter, and not switched off with METALLIC_PDL=0 (to measure what it gains)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("METALLIC_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel launch: the PDL constexpr and Triton's launch option."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def prefetch_enabled(device: torch.device) -> bool:
    """Whether the decode products that can prefetch their weights into L2 before waiting for
    their inputs do: METALLIC_PREFETCH=1 where PDL is on (without PDL there is no earlier
    kernel to overlap), until an engine run has measured it."""
    return os.environ.get("METALLIC_PREFETCH") == "1" and pdl_enabled(device)


@triton.jit
def prefetch_l2(ptr, offset, nbytes):
    """Ask the L2 for `nbytes` bytes from byte `offset` of `ptr` (one bulk prefetch a warp, from
    its first thread; the range widened to 16-byte bounds, as the instruction needs).

    Issued before ``wait_for_inputs``, it reads only what no earlier kernel writes (weights), so
    it may run while the previous kernel does: the L2 is coherent, a prefetch is only a hint,
    and the loads after the wait find the bytes there instead of in DRAM."""
    start = ptr.to(tl.int64) + offset
    low = start & -16
    size = (((start + nbytes + 15) & -16) - low).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; and.b32 t, t, 31; setp.eq.u32 p, t, 0;"
        " @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [low, size], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Wait until the previous kernel has finished (its writes visible), then let the next one
    launch: every program reaches this point, so the next kernel's programs queue behind ours."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
