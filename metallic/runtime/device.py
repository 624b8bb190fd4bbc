"""Device and compute-dtype choice: CUDA when present, bf16 where the hardware has it."""

from __future__ import annotations

import torch

from metallic.errors import MetallicError

DTYPES = {
    "f32": torch.float32,
    "float32": torch.float32,
    "f16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def choose_device(requested: str | torch.device | None = None) -> torch.device:
    """The requested device, or CUDA when available, else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise MetallicError(f"unknown device {requested!r} (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetallicError("CUDA was requested but no CUDA device is available")
    return device


def choose_dtype(device: torch.device, requested: str | torch.dtype | None = None) -> torch.dtype:
    """Storage/compute dtype of dense weights and activations; accumulation is always f32.

    CUDA: bf16 from sm80 (Ampere) on, f16 before. CPU: f16 storage (decode streams every weight
    from DRAM each token, and f16 halves those bytes: ~85 ms a Gemma 3 270M token against ~120 ms
    for f32 on a 2-core AVX2 machine); bf16 products are far slower than either there.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested is not None:
        try:
            return DTYPES[requested.lower()]
        except KeyError:
            raise MetallicError(f"unknown dtype {requested!r} (choose f32, f16 or bf16)") from None
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float16


def choose_vocab_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The embedding/output matrix (the largest, 168M values for Gemma 3) is read whole every
    token; on the CPU it stays f16 even when the layers run in f32, since it alone would double
    a decode step's DRAM traffic."""
    return torch.float16 if device.type == "cpu" and dtype == torch.float32 else dtype
