"""`metallic doctor`: what metallic runs on here, and why.

Reports the versions (metallic, torch, triton, gguf, python), the device (the GPU's model,
compute capability and memory free/total; or the CPU, and why no GPU is used), the compute dtype
chosen, whether the Triton kernels or the PyTorch path runs the ops and why, where Triton keeps
compiled kernels and how much it holds there, and the device's calibrated limits (`--calibrate`
measures them: runtime/calibration.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch

import metallic
from metallic.ops.dispatch import kernels_forced
from metallic.runtime import calibration
from metallic.runtime.device import choose_device, choose_dtype
from metallic.runtime.kernel_cache import triton_cache_dir

TRITON_MIN_CAPABILITY = (7, 0)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {
        "metallic": metallic.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for package in ("triton", "gguf"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def device_info(device: torch.device) -> dict[str, Any]:
    """The device's name and, on CUDA, capability and memory; on the CPU why no GPU runs."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        free, total = torch.cuda.mem_get_info(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": f"{major}.{minor}",
            "memory_free": free,
            "memory_total": total,
        }
    return {
        "type": "cpu",
        "name": f"CPU {calibration.cpu_model()}",
        "capability": None,
        "threads": torch.get_num_threads(),
        "no_gpu_because": _why_no_gpu(),
    }


def _why_no_gpu() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return (
            f"PyTorch is built for CUDA {torch.version.cuda} but sees no device "
            "(driver missing, or CUDA_VISIBLE_DEVICES hides it)"
        )
    return "the CPU was asked for (--device cpu)"


def kernel_path(device: torch.device) -> tuple[str, str]:
    """Which implementation runs the ops on `device` ("triton" or "torch") and why."""
    triton_version = versions()["triton"]
    if device.type == "cuda":
        if triton_version is None:
            return "none", "triton is not installed; the CUDA path needs it (pip install triton)"
        capability = torch.cuda.get_device_capability(device)
        if capability < TRITON_MIN_CAPABILITY:
            return "none", f"Triton needs compute capability 7.0 or newer; this GPU: {capability}"
        return "triton", "a CUDA device: Triton kernels read the weights in their GGUF blocks"
    if kernels_forced():
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "none", "METALLIC_FORCE_KERNELS=1 on the CPU needs TRITON_INTERPRET=1"
        return "triton", "METALLIC_FORCE_KERNELS=1: the Triton interpreter on the CPU (testing)"
    return "torch", "no CUDA device: PyTorch runs the ops on weights dequantized once at load"


def triton_cache() -> dict[str, Any]:
    """Where Triton keeps compiled kernels, and the files and bytes there."""
    folder = triton_cache_dir()
    files = [Path(root) / name for root, _, names in os.walk(folder) for name in names]
    size = 0
    for path in files:
        with contextlib.suppress(OSError):  # removed while we looked
            size += path.stat().st_size
    return {"dir": str(folder), "files": len(files), "bytes": size}


def diagnose(requested_device: str | None = None) -> dict[str, Any]:
    device = choose_device(requested_device)
    path, why = kernel_path(device)
    dtype = choose_dtype(device)
    activations = dtype if path == "triton" else torch.float32
    found = calibration.load(device)
    return {
        "versions": versions(),
        "device": device_info(device),
        "dtype": {
            "weights": _name(dtype),
            "activations": _name(activations),
        },
        "kernels": {"path": path, "why": why},
        "triton_cache": triton_cache(),
        "cache_dir": str(calibration.cache_dir()),
        "calibration": None if found is None else vars(found),
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def calibrate(requested_device: str | None = None) -> tuple[calibration.Calibration, Path]:
    """Measure the device's limits (matmul in the compute dtype on CUDA, f32 on the CPU) and
    cache them."""
    device = choose_device(requested_device)
    dtype = choose_dtype(device) if device.type == "cuda" else torch.float32
    measured = calibration.measure(device, dtype)
    return measured, calibration.save(measured)


def format_diagnosis(d: dict[str, Any]) -> str:
    v, dev, cache = d["versions"], d["device"], d["triton_cache"]
    lines = [
        f"metallic      {v['metallic']} (python {v['python']}, torch {v['torch']}, "
        f"triton {v['triton'] or 'not installed'}, gguf {v['gguf'] or 'not installed'})",
    ]
    if dev["type"] == "cuda":
        lines.append(
            f"device        {dev['name']}, compute capability {dev['capability']}, memory "
            f"{dev['memory_free'] / 2**30:.1f} GiB free of {dev['memory_total'] / 2**30:.1f} GiB"
        )
    else:
        lines.append(f"device        {dev['name']}, {dev['threads']} threads")
        lines.append(f"no GPU        {dev['no_gpu_because']}")
    lines += [
        f"compute dtype weights {d['dtype']['weights']}, activations {d['dtype']['activations']}"
        " (accumulation f32)",
        f"kernels       {d['kernels']['path']}: {d['kernels']['why']}",
        f"triton cache  {cache['dir']} ({cache['files']} files, {cache['bytes'] / 2**20:.1f} MiB)",
    ]
    found = d["calibration"]
    if found is None:
        lines.append("limits        not measured (metallic doctor --calibrate)")
    else:
        lines.append(f"limits        {format_calibration(found)}")
    lines.append(f"cache folder  {d['cache_dir']}")
    return "\n".join(lines)


def format_calibration(found: dict[str, Any]) -> str:
    return (
        f"copy {found['copy_bandwidth'] / 1e9:,.1f} GB/s, {found['matmul_dtype']} matmul "
        f"{found['matmul_flops'] / 1e12:,.3f} TFLOP/s (measured {found['date']}, "
        f"torch {found['torch']})"
    )
