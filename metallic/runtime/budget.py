"""The share of a device budget the process holds outside torch's allocator.

`--gpu-memory SIZE` bounds what the process holds on the device as `nvidia-smi` and
`torch.cuda.mem_get_info` report it. The memory plan (`runtime.placement`) counts torch
allocations: weights, KV cache, activations. Beside them a CUDA process holds its context (driver
state, the kernel modules loaded so far, local memory) and library handles such as cuBLAS's,
which torch's allocator never sees: on an H200 the 8B under a 2 GiB plan peaked at 2,545 MiB in
`nvidia-smi` with torch's allocations at 1,967 MiB. This module measures that share once at
start-up, after CUDA and cuBLAS are initialized, and adds an allowance for the Triton kernel
modules the first steps load later; the plan then works within what is left.

What is left is torch's, and `cap_torch` makes it a hard limit: the caching allocator may reserve
no more (it frees its cached blocks first, and fails an allocation rather than pass it), so the
slack it keeps beside live tensors is inside the budget too (at 2,560 MiB its reserved memory
peaked 471 MiB above its allocations).

The measurement is device-wide (`mem_get_info` knows no processes): on a GPU shared with other
processes, what they hold at start-up counts as well, so the plan errs towards less.
"""

from __future__ import annotations

import logging

import torch

from metallic.runtime.placement import BudgetTooSmall, MiB, Parts

# Device memory the kernel modules take once loaded (code, constants and the local memory their
# launches reserve): they load on the first steps, after the start-up measurement. Measured with
# benchmarks/gpu_budget.py: on an H200 the 8B's run grew the memory outside torch by 69 MiB after
# start-up (2026-12-04, --budget 2560M), past the 64 MiB first allowed; this leaves room over it.
KERNEL_MODULE_BYTES = 96 * MiB
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


def budget_overhead(device: torch.device, budget: int | None) -> Parts:
    """The parts of `budget` that the memory plan must leave to what torch does not allocate:
    the measured start-up share and the kernel modules' allowance (none on the CPU or without a
    budget). A budget that these alone fill is a one-line `BudgetTooSmall`."""
    if budget is None or device.type != "cuda":
        return ()
    measured = held_outside_torch(device)
    if measured + KERNEL_MODULE_BYTES >= budget:
        raise BudgetTooSmall(
            f"a device budget of {budget / MiB:.0f} MiB is too small: the CUDA context and "
            f"libraries alone hold {measured / MiB:.0f} MiB on this device, and kernels loaded "
            f"later need about {KERNEL_MODULE_BYTES / MiB:.0f} MiB more"
        )
    log.info(
        "device budget: %.0f MiB, of which the CUDA context and libraries hold %.0f MiB "
        "(measured at start-up) and kernels loaded later about %.0f MiB",
        budget / MiB,
        measured / MiB,
        KERNEL_MODULE_BYTES / MiB,
    )
    return (("CUDA context and libraries", measured), ("kernel modules", KERNEL_MODULE_BYTES))


def cap_torch(device: torch.device, n_bytes: int | None) -> None:
    """Let torch's caching allocator reserve at most `n_bytes` on `device` (CUDA only; None:
    the whole device, lifting an earlier engine's cap, since the cap is the process's): past
    it, the allocator frees its cached blocks, then fails the allocation with an out-of-memory
    error, which the engine reports as a one-line error."""
    if device.type != "cuda":
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0 if n_bytes is None else min(1.0, n_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    if n_bytes is not None:
        log.info("device budget: torch may reserve at most %.0f MiB", n_bytes / MiB)
