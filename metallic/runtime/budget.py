"""The share of a device budget the process holds outside torch's allocator.

`--gpu-memory SIZE` bounds what the process holds on the device as `nvidia-smi` and
`torch.cuda.mem_get_info` report it. The memory plan (`runtime.placement`) counts torch
allocations: weights, KV cache, activations. Beside them a CUDA process holds its context (driver
state, the kernel modules loaded so far, local memory) and library handles such as cuBLAS's,
which torch's allocator never sees: on an H200 the 8B under a 2 GiB plan peaked at 2,545 MiB in
`nvidia-smi` with torch's allocations at 1,967 MiB. This module measures that share once at
start-up, after CUDA and cuBLAS are initialized, and adds an allowance for the Triton kernel
modules the first steps load later; the plan then works within what is left.

The measurement is device-wide (`mem_get_info` knows no processes): on a GPU shared with other
processes, what they hold at start-up counts as well, so the plan errs towards less.
"""

from __future__ import annotations

import logging

import torch

from metallic.runtime.placement import BudgetTooSmall, MiB

# Device memory the Triton kernel modules take once loaded (code, constants and the local memory
# their launches reserve): they load on the first steps, after the start-up measurement. An
# allowance, to be checked against benchmarks/gpu_budget.py's "outside torch" growth on the GPU.
KERNEL_MODULE_BYTES = 64 * MiB
PROBE_SIDE = 64  # a matrix product this size makes cuBLAS create its handle and workspace

log = logging.getLogger("metallic")


def start_libraries(device: torch.device) -> None:
    """Initialize CUDA on `device` and have cuBLAS create its handle and workspace, so that
    what they hold is there to be measured."""
    torch.cuda.init()
    with torch.cuda.device(device):
        probe = torch.ones(PROBE_SIDE, PROBE_SIDE, device=device)
        torch.mm(probe, probe)
        torch.cuda.synchronize(device)


def held_outside_torch(device: torch.device) -> int:
    """Bytes `device` holds beyond torch's reserved memory once CUDA and cuBLAS are running:
    the CUDA context, library handles and loaded modules (and any other process's memory)."""
    start_libraries(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def budget_overhead(device: torch.device, budget: int | None) -> int:
    """Bytes of `budget` that the memory plan must leave to what torch does not allocate: the
    measured start-up share plus the kernel modules' allowance (0 on the CPU or without a
    budget). A budget that this alone fills is a one-line `BudgetTooSmall`."""
    if budget is None or device.type != "cuda":
        return 0
    measured = held_outside_torch(device)
    overhead = measured + KERNEL_MODULE_BYTES
    if overhead >= budget:
        raise BudgetTooSmall(
            f"a device budget of {budget / MiB:.0f} MiB is too small: the CUDA context and "
            f"libraries alone hold {measured / MiB:.0f} MiB on this device, and kernels loaded "
            f"later need about {KERNEL_MODULE_BYTES / MiB:.0f} MiB more"
        )
    log.info(
        "device budget: %.0f MiB, of which the CUDA context and libraries hold %.0f MiB "
        "(measured at start-up) and kernels loaded later about %.0f MiB; %.0f MiB are left "
        "for weights, KV cache and activations",
        budget / MiB,
        measured / MiB,
        KERNEL_MODULE_BYTES / MiB,
        (budget - overhead) / MiB,
    )
    return overhead
