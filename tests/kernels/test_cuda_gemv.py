"""The CUDA C decode product (kernels/cuda/gemv_q4_k.cu) on the CPU.

The kernel's arithmetic, `chunk_dot`, is plain C++ where CUDA is absent: the host compiler builds
it with a loop that hands each (row, super-block, chunk) the words the kernel's lanes load, and
the sums are checked against the reference-dequantized matrix times x as rounded to int8, in
float64. What only the GPU can run (the loads, the warp sums, programmatic launch) is checked by
benchmarks/gpu_cuda_gemv.py there. Seeds are fresh each run and in messages.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError
from metallic.kernels import nvrtc, prepare_weight
from metallic.kernels.cuda_gemv import block_warps, gemv_q4_k, takes
from metallic.kernels.quant_gemv import gemv, quantize_x
from metallic.quant.quantize import quantize
from metallic.quant.reference import dequantize

T = GGMLQuantizationType

# Each (row, super-block) as the kernel's four lanes see it: vectors of 16 bytes, header at 9 sb,
# chunk j's quants at 9 sb + 1 + 2j and + 2 + 2j; x's quants from vector 16 sb + 4j, its scales
# as float2 4 sb + j and half sums as float4 4 sb + j.
_HARNESS = r"""
#include "gemv_q4_k.cu"
extern "C" void rows_dot(const uint4* w, int n, int n_sb, const int4* xq, const float2* dx,
                         const float4* xs, float* out) {
    for (int row = 0; row < n; ++row) {
        float acc = 0.0f;
        for (int sb = 0; sb < n_sb; ++sb) {
            const uint4* blk = w + (long)row * n_sb * 9 + sb * 9;
            for (int j = 0; j < 4; ++j) {
                const int4* xv = xq + sb * 16 + 4 * j;
                acc += chunk_dot(blk[0], blk[1 + 2 * j], blk[2 + 2 * j], xv[0], xv[1], xv[2],
                                 xv[3], dx[sb * 4 + j], xs[sb * 4 + j], j);
            }
        }
        out[row] = acc;
    }
}
"""


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "the C++ compiler that builds the CUDA kernel's arithmetic for the CPU"
    folder = tmp_path_factory.mktemp("cuda_gemv")
    (folder / "harness.cpp").write_text(_HARNESS)
    library = folder / "harness.so"
    subprocess.run(
        [compiler, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{nvrtc.SOURCES}", "-o",
         str(library), str(folder / "harness.cpp")],
        check=True,
    )  # fmt: skip
    return ctypes.CDLL(str(library))


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("n,k", [(3, 256), (5, 1024), (2, 2304)])
def test_chunk_arithmetic_matches_the_reference(host_kernel: ctypes.CDLL, n: int, k: int) -> None:
    seed = _seed()
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    values[0, :64] += 0.5  # large scales and mins in the first sub-blocks
    raw = torch.from_numpy(quantize(values, T.Q4_K).reshape(-1).copy())
    w = dequantize(raw, T.Q4_K, n * k).view(n, k).double()
    x = torch.from_numpy(rng.standard_normal(k).astype(np.float32))
    xq, dx, xs = quantize_x(x)
    out = torch.empty(n, dtype=torch.float32)
    words = raw.view(torch.int32).contiguous()
    host_kernel.rows_dot(
        _pointer(words), n, k // 256, _pointer(xq), _pointer(dx), _pointer(xs), _pointer(out)
    )
    rounded = (xq.view(-1, 32).double() * dx[:, None].double()).view(-1)
    expected = w @ rounded
    scale = (w.abs() @ rounded.abs()).max()
    assert torch.allclose(out.double(), expected, rtol=0, atol=2e-6 * float(scale)), seed


def test_chunk_arithmetic_equals_the_triton_kernel(host_kernel: ctypes.CDLL) -> None:
    """The same sums as quant_gemv's dp4a kernels (in the interpreter), up to f32 ordering."""
    seed = _seed()
    n, k = 8, 512
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(
        quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, T.Q4_K).reshape(-1).copy()
    )
    x = torch.from_numpy(rng.standard_normal(k).astype(np.float32)).to(torch.bfloat16)
    xq = quantize_x(x)
    triton_out = gemv(xq, prepare_weight(raw, T.Q4_K, n, k), torch.empty(1, n))
    out = torch.empty(n, dtype=torch.float32)
    host_kernel.rows_dot(
        _pointer(raw.view(torch.int32)), n, k // 256, *(_pointer(t) for t in xq), _pointer(out)
    )
    assert torch.allclose(out, triton_out[0], rtol=1e-5, atol=1e-5), seed


def test_block_warps_cover_k_in_one_turn_up_to_eight_warps() -> None:
    assert [block_warps(k) for k in (256, 2048, 4096, 14336, 16384, 32768)] == [1, 1, 2, 7, 8, 8]


def test_the_kernel_takes_one_row_of_q4_k_on_a_cuda_device_only() -> None:
    raw = torch.from_numpy(quantize(np.zeros((4, 256), np.float32), T.Q4_K).reshape(-1).copy())
    weight = prepare_weight(raw, T.Q4_K, 4, 256)
    xq = quantize_x(torch.zeros(256))
    assert not takes(xq, [weight], 1, 2)  # CPU tensors
    with pytest.raises(ValueError, match="one row of x"):
        gemv_q4_k(xq, [weight], torch.empty(1, 4))
    # Enabled, a CPU product keeps the Triton kernel (here the interpreter's).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METALLIC_CUDA_GEMV", "1")
        out = gemv(xq, weight, torch.empty(1, 4))
    assert torch.equal(out, torch.zeros(1, 4))


def test_a_missing_nvrtc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    nvrtc._nvrtc.cache_clear()
    monkeypatch.setattr(torch.version, "cuda", "99.0")
    monkeypatch.setattr(nvrtc.ctypes, "CDLL", _no_library)
    try:
        with pytest.raises(MetallicError, match="NVRTC is not available"):
            nvrtc.compile_cubin("", "empty.cu", [])
    finally:
        nvrtc._nvrtc.cache_clear()


def _no_library(name: str) -> ctypes.CDLL:
    raise OSError(f"{name}: cannot open shared object file")


def test_launch_structures_have_the_driver_api_sizes() -> None:
    """CUlaunchAttribute (id, 4 bytes of padding, a 64-byte union) and CUlaunchConfig as
    cuda.h lays them out on 64-bit hosts."""
    assert ctypes.sizeof(nvrtc._LaunchAttribute) == 72
    assert ctypes.sizeof(nvrtc._LaunchConfig) == 56
    assert nvrtc._LaunchConfig.stream.offset == 32


def test_cubins_are_cached_by_source_and_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A compile's cubin is kept in metallic's cache folder and read back by the next process;
    other macro values compile again."""
    compiles = []

    def fake_compile(source: str, name: str, options: list[str]) -> bytes:
        compiles.append(options)
        return f"cubin {options}".encode()

    monkeypatch.setenv("METALLIC_CACHE", str(tmp_path))
    monkeypatch.setattr(nvrtc, "compile_cubin", fake_compile)
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 0))
    first = nvrtc.cached_cubin("gemv_q4_k.cu", {"ROWS": 2}, "sm_90")
    assert nvrtc.cached_cubin("gemv_q4_k.cu", {"ROWS": 2}, "sm_90") == first
    assert len(compiles) == 1
    assert "-DROWS=2" in compiles[0] and "--gpu-architecture=sm_90" in compiles[0]
    nvrtc.cached_cubin("gemv_q4_k.cu", {"ROWS": 4}, "sm_90")
    assert len(compiles) == 2
    assert len(list((tmp_path / "cuda").glob("*.cubin"))) == 2
