"""The dp4a decode kernels (metallic.kernels.quant_gemv) against the float decode kernel, at
Llama-3-8B shapes: correctness first, then a sweep of their geometry, then the defaults.

Each timed dp4a call rounds x to int8 (one kernel) and runs the product, as the model does; the
float kernel (quant_matmul, M = 1) runs on the same bf16 x. Times are per call, replayed back to
back from one CUDA graph over enough weight copies to defeat the L2 (gpu_quant_matmul.py's
method). Beside them: the same bytes read by a plain streaming Triton kernel (what any kernel
reading this matrix can reach, launch included), and a device-to-device copy's bandwidth.

GPU only:  python benchmarks/gpu_gemv.py   (JSON to $OUT or benchmarks/results)
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType
from gpu_quant_matmul import ROTATION_BYTES, copy_bandwidth, graph_us, random_blocks, relative_error

from metallic.kernels import dequantize_gpu, prepare_weight, quant_matmul
from metallic.kernels.quant_gemv import gemv, quantize_x

T = GGMLQuantizationType
SHAPES = {
    T.Q4_K: ((5120, 4096), (4096, 4096), (28672, 4096), (4096, 14336)),
    T.Q6_K: ((1024, 4096), (4096, 14336), (128256, 4096)),
}
ROWS, SBS, WARPS, PROGRAMS_PER_SM, STAGES = (4, 8, 16, 32), (4, 8, 16), (4, 8), (1, 4), (1, 3)


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """XOR of PER_PROGRAM blocks of int32 words: a pure read at the GEMVs' access width."""
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    start = tl.program_id(0) * BLOCK * PER_PROGRAM
    for i in range(PER_PROGRAM):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.reduce_or(acc, axis=0))


def read_us(raws: list[torch.Tensor]) -> float:
    """Best time to read one weight copy's bytes with a plain streaming kernel."""
    words = [r.view(torch.int32) for r in raws]
    n = words[0].numel()
    best = float("inf")
    for per_program in (1, 4, 16):
        grid = (triton.cdiv(n, 2048 * per_program),)
        sink = torch.empty(grid[0], dtype=torch.int32, device="cuda")

        def read(w: torch.Tensor, p: int = per_program, g: tuple = grid, s=sink) -> None:
            _read_kernel[g](w, s, n, BLOCK=2048, PER_PROGRAM=p, num_warps=8)

        best = min(best, graph_us([lambda w=w: read(w) for w in words]))
    return best


@triton.jit
def _q4_k_tile_read_kernel(
    w_ptr,
    xq_ptr,
    out_ptr,
    N,
    row_words,
    n_sb,
    BN: tl.constexpr,
    S: tl.constexpr,
    WITH_X: tl.constexpr,
):
    """The dp4a Q4_K kernel's loads of quant words (and with WITH_X its loads of x's words), in
    its tiles, XORed instead of multiplied: what its access pattern alone costs."""
    ids = tl.program_id(0) * BN + tl.arange(0, BN)
    r = tl.minimum(ids, N - 1).to(tl.int64)[:, None, None, None]
    j = tl.arange(0, 4)[None, None, :, None]
    w = tl.arange(0, 8)[None, None, None, :]
    acc = tl.zeros((BN, S, 4, 8), dtype=tl.int32)
    for s in range(0, n_sb, S):
        sb = s + tl.arange(0, S)[None, :, None, None]
        acc ^= tl.load(w_ptr + r * row_words + sb * 36 + 4 + 8 * j + w)
        if WITH_X:
            xw = sb * 64 + 16 * j + w
            acc ^= tl.load(xq_ptr + xw) ^ tl.load(xq_ptr + xw + 8)
    tl.store(out_ptr + ids, tl.reduce_or(tl.reshape(acc, (BN, S * 32)), axis=1), mask=ids < N)


def tile_read_us(copies: list, xq: torch.Tensor, n: int, k: int, with_x: bool) -> float:
    """The Q4_K tile-read kernel at the dp4a kernel's default geometry for K = 4096 (8 rows,
    up to 16 super-blocks a step, 4 warps)."""
    sink = torch.empty(n, dtype=torch.int32, device="cuda")
    words = xq.view(torch.int32)
    steps = 16  # super-blocks a step: the largest power of two <= 16 dividing K / 256
    while (k // 256) % steps:
        steps //= 2

    def read(packed) -> None:
        _q4_k_tile_read_kernel[(triton.cdiv(n, 8),)](
            packed.planes[0], words, sink, n, k // 256 * 36, k // 256, BN=8,
            S=steps, WITH_X=with_x, num_warps=4,
        )  # fmt: skip

    return graph_us([lambda c=c: read(c) for c in copies])


def bench_shape(
    qtype: GGMLQuantizationType, n: int, k: int, gen: torch.Generator, copy_bw: float,
    failures: list[str],
) -> dict[str, object]:  # fmt: skip
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    raw = random_blocks(qtype, n, k, gen)
    count = min(16, -(-ROTATION_BYTES // raw.numel()))
    raws = [raw] + [random_blocks(qtype, n, k, gen) for _ in range(count - 1)]
    copies = [prepare_weight(r, qtype, n, k) for r in raws]
    dense = dequantize_gpu(copies[0], qtype, n, k).double()
    x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    xq = quantize_x(x[0])
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ dense.T
    exact = (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(1, k) @ dense.T
    gemv(xq, copies[0], out)
    row: dict[str, object] = {
        "format": qtype.name, "n": n, "k": k, "weight_bytes": raw.numel(),
        "err_vs_rounded_x": relative_error(out, exact), "err_vs_x": relative_error(out, ref),
    }  # fmt: skip
    if not row["err_vs_rounded_x"] < 1e-2:
        failures.append(f"{qtype.name} [{n}, {k}]: {row['err_vs_rounded_x']:.3g} vs rounded x")
    sweep = []
    for rows, sbs, warps, per_sm, stages in itertools.product(
        ROWS, SBS, WARPS, PROGRAMS_PER_SM, STAGES
    ):
        splits = max(1, min(k // 256, -(-per_sm * sms // -(-n // rows))))
        kw = dict(rows=rows, sbs=sbs, splits=splits, num_warps=warps, stages=stages)
        gemv(xq, copies[0], out, **kw)
        err = relative_error(out, exact)
        if not err < 1e-2:
            failures.append(f"{qtype.name} [{n}, {k}] {kw}: {err:.3g} vs rounded x")
            continue
        us = graph_us([lambda w=w, kw=kw: gemv(quantize_x(x[0]), w, out, **kw) for w in copies])
        sweep.append((us, kw))
    sweep.sort(key=lambda t: t[0])
    row["read_us"] = read_us(raws)
    if qtype == T.Q4_K:
        row["tile_read_us"] = tile_read_us(copies, xq[0], n, k, with_x=False)
        row["tile_read_x_us"] = tile_read_us(copies, xq[0], n, k, with_x=True)
        row["dp4a_no_rounding_us"] = graph_us([lambda w=w: gemv(xq, w, out) for w in copies])
    row["float_us"] = graph_us([lambda w=w: quant_matmul(x, w, qtype, n, k) for w in copies])
    row["dp4a_us"] = graph_us([lambda w=w: gemv(quantize_x(x[0]), w, out) for w in copies])
    row["sweep_best_us"], row["sweep_best"] = sweep[0] if sweep else (None, None)
    row["sweep_top5"] = [(round(us, 2), kw) for us, kw in sweep[:5]]
    for key in ("read", "float", "dp4a"):
        row[f"{key}_copy_pct"] = 100 * raw.numel() / (row[f"{key}_us"] * 1e-6) / copy_bw
    return row


def main() -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    print(f"{device}: copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    failures: list[str] = []
    results = []
    for qtype, shapes in SHAPES.items():
        for n, k in shapes:
            results.append(bench_shape(qtype, n, k, gen, copy_bw, failures))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{device}, copy {copy_bw / 1e12:.2f} TB/s; µs per product (% of copy bandwidth)")
    print("| format | N x K | MB | plain read | float kernel | dp4a (defaults) | sweep best |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['format']} | {r['n']}x{r['k']} | {r['weight_bytes'] / 1e6:.1f} | "
            f"{r['read_us']:.1f} ({r['read_copy_pct']:.0f}%) | "
            f"{r['float_us']:.1f} ({r['float_copy_pct']:.0f}%) | "
            f"{r['dp4a_us']:.1f} ({r['dp4a_copy_pct']:.0f}%) | {r['sweep_best_us']:.1f} |"
        )
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "copy_bw": copy_bw, "results": results, "failures": failures}
    (out_dir / "gpu_gemv.json").write_text(json.dumps(result, indent=1))
    print("\nQ4_K at the default geometry, µs: quant-word loads only | + x loads | the product")
    for r in results:
        if "tile_read_us" in r:
            print(
                f"{r['n']}x{r['k']}: {r['tile_read_us']:.1f} | {r['tile_read_x_us']:.1f} | "
                f"{r['dp4a_no_rounding_us']:.1f} (plain read {r['read_us']:.1f})"
            )
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
