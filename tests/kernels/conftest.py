"""Kernel tests run in the Triton interpreter (CI has no GPU) with NaN-poisoned allocations.

The interpreter's `tl.dot` multiplies bfloat16 operands as their raw bit patterns (values near
1e10; triton-lang/triton#11584, "not supported yet"), so the kernels that call `tl.dot` (attention,
the DOT and GEMM tiles) are tested in float16 and float32; bfloat16 runs them on the GPU only.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any test module imports triton

import pytest
import torch


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float buffer a wrapper allocates starts as NaN, so an unwritten element shows."""
    real_empty = torch.empty

    def nan_empty(*args: object, **kwargs: object) -> torch.Tensor:
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)
