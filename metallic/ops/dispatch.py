"""Which implementation an op runs: the Triton kernels on CUDA, PyTorch elsewhere.

`METALLIC_FORCE_KERNELS=1` (with `TRITON_INTERPRET=1`) runs the kernels on CPU tensors too: that
is how the test suite checks the GPU path end to end on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch


def kernels_forced() -> bool:
    return os.environ.get("METALLIC_FORCE_KERNELS") == "1"


def use_kernels(t: torch.Tensor | torch.device) -> bool:
    device = t if isinstance(t, torch.device) else t.device
    return device.type == "cuda" or kernels_forced()
