"""The device's limits, measured once and cached: copy bandwidth and matmul throughput.

A roofline needs what the hardware can do, and data sheets overstate it (an H200's 4.8 TB/s is
~4.2 TB/s copied). `measure` times a large device-to-device copy (bytes read plus bytes written
per second) and a large square matmul in the compute dtype (bf16 or f16 on CUDA, f32 on the CPU,
where it uses torch's threads); `save` keeps the result in `calibration.json` under the user's
cache folder, one entry per device, for `load` to find in later runs.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from metallic.errors import MetallicError
from metallic.gguf.cache import cache_dir

FILE_NAME = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    device: str  # the key it is cached under (device_key)
    copy_bandwidth: float  # bytes read + written per second
    matmul_flops: float  # FLOP/s of a square matmul in matmul_dtype
    matmul_dtype: str
    date: str
    torch: str


def device_key(device: torch.device) -> str:
    """What identifies a device's limits: the GPU model, or the CPU model and torch's threads."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(
    device: torch.device,
    dtype: torch.dtype,
    *,
    copy_bytes: int | None = None,
    matmul_size: int | None = None,
    repeats: int = 20,
) -> Calibration:
    """Time a copy of `copy_bytes` (default 1 GiB on CUDA, 128 MiB on the CPU) and an n x n x n
    matmul (default 8192 on CUDA, 1024 on the CPU); the medians of `repeats` runs each."""
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if cuda else 128 << 20)
    n = matmul_size or (8192 if cuda else 1024)
    copy_s = _copy_seconds(device, copy_bytes, repeats)
    matmul_s = _matmul_seconds(device, dtype, n, repeats)
    return Calibration(
        device=device_key(device),
        copy_bandwidth=2 * copy_bytes / copy_s,
        matmul_flops=2.0 * n**3 / matmul_s,
        matmul_dtype=str(dtype).removeprefix("torch."),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
    )


def _copy_seconds(device: torch.device, n_bytes: int, repeats: int) -> float:
    src = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), device, repeats)


def _matmul_seconds(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return _median_seconds(lambda: torch.mm(a, b, out=out), device, repeats)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` after two warm-up calls: CUDA events on the GPU, else the
    host's clock."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e-3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def _read(path: Path) -> dict[str, dict[str, object]]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise MetallicError(f"{path}: cannot read the calibration cache: {err}") from None
    return entries if isinstance(entries, dict) else {}


def save(calibration: Calibration, folder: Path | None = None) -> Path:
    """Add (or replace) the device's entry in the cache file; returns its path."""
    path = (folder or cache_dir()) / FILE_NAME
    entries = _read(path)
    entries[calibration.device] = asdict(calibration)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        tmp.replace(path)
    except OSError as err:
        raise MetallicError(f"{path}: cannot write the calibration: {err.strerror}") from None
    return path


def load(device: torch.device, folder: Path | None = None) -> Calibration | None:
    """The cached limits of `device`, or None when it was never calibrated."""
    entry = _read((folder or cache_dir()) / FILE_NAME).get(device_key(device))
    try:
        return Calibration(**entry) if isinstance(entry, dict) else None
    except TypeError:  # written by another version of metallic
        return None
