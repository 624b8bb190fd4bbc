"""Start-up work that can run beside loading a model, on a thread: the GPU's side of it.

Two slow steps of a GPU run wait on the device or the disk, not on Python: creating the CUDA
context (the first allocation on the device) and the hash of Triton's own installation that keys
its kernel cache (`triton_key`: ~400 MB read and hashed, 0.3-0.7 s, at the first kernel a
process compiles or loads; memoized). `start_gpu_warmup` does both on a thread while the loader
builds the tokenizer and reads the weights, and the loader joins it before the first kernel.
Either step failing on the thread changes nothing: the main thread meets and reports the same
problem when it gets there.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from metallic.runtime.kernel_cache import compiles_kernels


def start_gpu_warmup(device: torch.device) -> threading.Thread | None:
    """The started thread, or None where nothing is to be done (the CPU, the interpreter)."""
    if not compiles_kernels(device):
        return None
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # no triton (the loader says so later), or one keyed otherwise
        triton_key = None

    def run() -> None:
        with contextlib.suppress(Exception):
            torch.empty(1, device=device)  # the CUDA context, made once per process
        if triton_key is not None:
            with contextlib.suppress(Exception):
                triton_key()

    thread = threading.Thread(target=run, name="metallic-gpu-warmup", daemon=True)
    thread.start()
    return thread
