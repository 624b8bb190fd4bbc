"""The CUDA C decode products (kernels/cuda/gemv.cu) on the CPU.

Each format's code (where a row starts, a lane's loads of weights and x, its arithmetic) is plain
C++ where CUDA is absent: the host compiler builds it with a loop that visits every (row,
super-block, lane) the kernel's lanes cover, and the sums are checked against the
reference-dequantized matrix times x as rounded to int8, in float64, and against the Triton
dp4a kernels. What only the GPU can run (the lanes' mapping to threads, the warp sums,
programmatic launch) is checked by benchmarks/gpu_cuda_gemv.py there. Seeds are fresh each run
and in messages.
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
from metallic.kernels.cuda_gemv import block_warps, gemv, takes
from metallic.kernels.packing import PackedWeight
from metallic.kernels.quant_gemv import gemv as triton_gemv
from metallic.kernels.quant_gemv import quantize_x
from metallic.quant.quantize import quantize
from metallic.quant.reference import dequantize

T = GGMLQuantizationType

_HARNESS = r"""
#include "gemv.cu"
template <class F>
void rows_dot(typename F::Matrix m, int n, int n_sb, const int4* xq, const float* dx,
              const float* xs, float* out) {
    for (int row = 0; row < n; ++row) {
        float acc = 0.0f;
        const typename F::Matrix r = F::row(m, row, n_sb);
        for (int sb = 0; sb < n_sb; ++sb) {
            for (int j = 0; j < 4; ++j) {
                acc += F::dot(F::load(r, sb, j), F::load_x(xq, dx, xs, sb, j), j);
            }
        }
        out[row] = acc;
    }
}
extern "C" void q4_k_rows(const uint4* w, int n, int n_sb, const int4* xq, const float* dx,
                          const float* xs, float* out) {
    rows_dot<Q4K>({w}, n, n_sb, xq, dx, xs, out);
}
extern "C" void q6_k_rows(const uint4* ql, const uint4* qh, const uint4* scales,
                          const unsigned short* d, int n, int n_sb, const int4* xq,
                          const float* dx, const float* xs, float* out) {
    rows_dot<Q6K>({ql, qh, scales, d}, n, n_sb, xq, dx, xs, out);
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "the C++ compiler that builds the CUDA kernels' code for the CPU"
    folder = tmp_path_factory.mktemp("cuda_gemv")
    (folder / "harness.cpp").write_text(_HARNESS)
    library = folder / "harness.so"
    subprocess.run(
        [compiler, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{nvrtc.SOURCES}", "-o",
         str(library), str(folder / "harness.cpp")],
        check=True,
    )  # fmt: skip
    return ctypes.CDLL(str(library))


def _host_rows(
    kernels: ctypes.CDLL, weight: PackedWeight, xq: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Every row of `weight` times x by the kernels' code on the CPU, f32."""
    out = torch.empty(weight.n, dtype=torch.float32)
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in weight.planes]
    x = [ctypes.c_void_p(t.data_ptr()) for t in (*xq, out)]
    n_sb = weight.k // 256
    if weight.ggml_type == T.Q4_K:
        kernels.q4_k_rows(pointers[0], weight.n, n_sb, *x)
    else:
        kernels.q6_k_rows(*pointers, weight.n, n_sb, *x)
    return out


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
@pytest.mark.parametrize("n,k", [(3, 256), (5, 1024), (2, 2304)])
def test_lanes_sum_to_the_reference(
    host_kernels: ctypes.CDLL, qtype: GGMLQuantizationType, n: int, k: int
) -> None:
    seed = _seed()
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    values[0, :64] += 0.5  # large scales and mins in the first sub-blocks
    raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
    w = dequantize(raw, qtype, n * k).view(n, k).double()
    x = torch.from_numpy(rng.standard_normal(k).astype(np.float32))
    xq = quantize_x(x)
    out = _host_rows(host_kernels, prepare_weight(raw, qtype, n, k), xq)
    rounded = (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(-1)
    expected = w @ rounded
    scale = (w.abs() @ rounded.abs()).max()
    assert torch.allclose(out.double(), expected, rtol=0, atol=2e-6 * float(scale)), seed


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_lanes_sum_as_the_triton_kernel(
    host_kernels: ctypes.CDLL, qtype: GGMLQuantizationType
) -> None:
    """The same sums as quant_gemv's dp4a kernels (in the interpreter), up to f32 ordering."""
    seed = _seed()
    n, k = 8, 512
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(
        quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype).reshape(-1).copy()
    )
    weight = prepare_weight(raw, qtype, n, k)
    xq = quantize_x(torch.from_numpy(rng.standard_normal(k).astype(np.float32)).bfloat16())
    triton_out = triton_gemv(xq, weight, torch.empty(1, n))
    out = _host_rows(host_kernels, weight, xq)
    assert torch.allclose(out, triton_out[0], rtol=1e-5, atol=1e-5), seed


def test_block_warps_cover_k_in_the_turns_asked_up_to_eight_warps() -> None:
    ks = (256, 2048, 4096, 14336, 16384, 32768, 65536)
    assert [block_warps(k, 1) for k in ks] == [1, 1, 2, 7, 8, 8, 8]
    assert [block_warps(k, 2) for k in ks] == [1, 1, 1, 4, 4, 8, 8]


def test_the_kernels_take_one_row_on_a_cuda_device_only() -> None:
    raw = torch.from_numpy(quantize(np.zeros((4, 256), np.float32), T.Q4_K).reshape(-1).copy())
    weight = prepare_weight(raw, T.Q4_K, 4, 256)
    xq = quantize_x(torch.zeros(256))
    assert not takes(xq, [weight], 1, 2)  # CPU tensors
    with pytest.raises(ValueError, match="one row of x"):
        gemv(xq, [weight], torch.empty(1, 4))
    # Enabled, a CPU product keeps the Triton kernel (here the interpreter's).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METALLIC_CUDA_GEMV", "1")
        out = triton_gemv(xq, weight, torch.empty(1, 4))
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
    first = nvrtc.cached_cubin("gemv.cu", {"ROWS": 2}, "sm_90")
    assert nvrtc.cached_cubin("gemv.cu", {"ROWS": 2}, "sm_90") == first
    assert len(compiles) == 1
    assert "-DROWS=2" in compiles[0] and "--gpu-architecture=sm_90" in compiles[0]
    nvrtc.cached_cubin("gemv.cu", {"ROWS": 4}, "sm_90")
    assert len(compiles) == 2
    assert len(list((tmp_path / "cuda").glob("*.cubin"))) == 2
