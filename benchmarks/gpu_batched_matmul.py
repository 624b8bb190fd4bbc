"""Products of 1..512 rows of x against quantized weights: the fused kernel (quant_matmul's DOT
mode, which dequantizes inside its tensor-core tiles) against the path before it, dense cuBLAS
and the bandwidth floor, at the shapes of Llama-3-8B Q4_K_M and Gemma 3 270M Q4_K_M.

For every matrix (random valid blocks, fresh seeds): the dequantized matrix is checked bit-exact
against metallic.quant.reference on its first and last rows, then every M's bf16 product against
x.double() @ W.double().T; then each M is timed as gpu_quant_matmul.py times (calls replayed back
to back from one CUDA graph, each on its own weight copy, enough copies to defeat the L2):

- fused: quant_matmul with its tile table (M = 1: the FMA mode; the model's one-row products
  against large K-quants take the dp4a kernels instead, see gpu_gemv.py);
- before: the path before batched kernels: the DOT mode with its old tile up to 16 rows,
  dequantize into a scratch matrix + torch.matmul above;
- cuBLAS: torch.matmul against a dense bf16 matrix of the same shape (the compute reference);
- floor: the weight's bytes over a device-to-device copy's bandwidth, measured in the same run.

    python benchmarks/gpu_batched_matmul.py                  # about 2-3 minutes on an H200
    python benchmarks/gpu_batched_matmul.py --m 512,1024,2048  # where fused and dequantize cross
    python benchmarks/gpu_batched_matmul.py --sweep 16,32    # tile candidates at these M
    TRITON_INTERPRET=1 python benchmarks/gpu_batched_matmul.py --smoke   # CPU: correctness only

JSON goes to $OUT or benchmarks/results.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import sys
import time
from functools import partial

import torch
import triton
from gguf import GGMLQuantizationType
from gpu_quant_matmul import (
    ROTATION_BYTES,
    check_reference_rows,
    copy_bandwidth,
    graph_us,
    output_dir,
    random_blocks,
    relative_error,
    weight_copies,
)
from triton.runtime.errors import OutOfResources

from metallic.kernels import PackedWeight, dequantize_gpu, prepare_weight, quant_matmul

# The module (the package exports its function under the same name): its tile table and tiles.
qm = importlib.import_module("metallic.kernels.quant_matmul")

T = GGMLQuantizationType
# (label, N, K, format): the stacked products of one layer and the output head, as the loader
# merges them (parts of one format in one matrix) for metallic.testing.synthetic's Q4_K_M mix.
LLAMA3_8B = (
    ("8B attn_q/o", 4096, 4096, T.Q4_K),
    ("8B q|k|v", 6144, 4096, T.Q4_K),
    ("8B gate|up", 28672, 4096, T.Q4_K),
    ("8B down", 4096, 14336, T.Q4_K),
    ("8B down", 4096, 14336, T.Q6_K),
    ("8B output", 128256, 4096, T.Q6_K),
)
GEMMA3_270M = (  # hidden 640 is no multiple of 256: the Q4_K of q/k/v/gate/up falls back to Q5_0
    ("270M q|k|v", 1536, 640, T.Q5_0),
    ("270M v", 256, 640, T.Q8_0),
    ("270M attn_o", 640, 1024, T.Q4_K),
    ("270M gate|up", 4096, 640, T.Q5_0),
    ("270M down", 640, 2048, T.Q4_K),
    ("270M down", 640, 2048, T.Q6_K),
    ("270M output", 262144, 640, T.Q8_0),
)
SMOKE_SHAPES = (  # N >= 64: check_reference_rows compares the first and last 64 rows
    ("tiny Q4_K", 72, 512, T.Q4_K),
    ("tiny Q6_K", 64, 768, T.Q6_K),
    ("tiny Q5_0", 80, 352, T.Q5_0),
    ("tiny Q8_0", 64, 640, T.Q8_0),
)
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512)
SMOKE_M = (1, 3, 17, 64, 160)
# The DOT mode's geometry before the tile table (dense weights took 16 rows a program).
BEFORE_TILE = qm.DotTile(bm=16, bn=64, groups=8, warps=4, stages=3, programs_per_sm=4)
BEFORE_DENSE_TILE = dataclasses.replace(BEFORE_TILE, bn=16)
BEFORE_MAX_FUSED_M = 16
# ||out - ref|| / ||ref||: bf16 rounds each weight for the tensor cores and the output (2**-9
# relative each, RMS ~3e-3 together); f16 (the interpreter, whose bf16 tl.dot is broken) 2**-11.
BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def before_path(x: torch.Tensor, packed, qtype: GGMLQuantizationType) -> torch.Tensor:
    """The product as ops.linear ran it before the batched kernels."""
    n, k = packed.n, packed.k
    if x.shape[0] > BEFORE_MAX_FUSED_M:
        return torch.matmul(x, dequantize_gpu(packed, qtype, n, k, x.dtype).T)
    tile = BEFORE_DENSE_TILE if qtype in (T.F16, T.BF16) else BEFORE_TILE
    return quant_matmul(x, packed, qtype, n, k, tile=tile if x.shape[0] > 1 else None)


def check_shape(
    label: str, n: int, k: int, qtype: GGMLQuantizationType, m_values: tuple[int, ...],
    gen: torch.Generator, dtype: torch.dtype, failures: list[str], copies: bool = False,
) -> tuple[list[PackedWeight], torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random blocks, their packed weight (and with ``copies`` weight_copies' others), x for the
    largest M and the dequantized matrix; every M's product checked in float64."""
    raw = random_blocks(qtype, n, k, gen)
    packed = weight_copies(qtype, raw, n, k, gen) if copies else [prepare_weight(raw, qtype, n, k)]
    dense = dequantize_gpu(packed[0], qtype, n, k)
    check_reference_rows(qtype, raw, dense, k, failures)
    x_all = torch.randn(max(m_values), k, device=gen.device, generator=gen).to(dtype)
    ref_all = x_all.double() @ dense.double().T
    for m in m_values:
        err = relative_error(quant_matmul(x_all[:m], packed[0], qtype, n, k), ref_all[:m])
        if not err <= BOUND[dtype]:
            failures.append(f"{label} {qtype.name} [{n}, {k}] M={m}: relative error {err:.3g}")
    return packed, x_all, dense


def time_shape(
    label: str, n: int, k: int, qtype: GGMLQuantizationType, m_values: tuple[int, ...],
    gen: torch.Generator, copy_bw: float, failures: list[str],
) -> list[dict[str, object]]:  # fmt: skip
    copies, x_all, dense = check_shape(
        label, n, k, qtype, m_values, gen, torch.bfloat16, failures, copies=True
    )
    nbytes = copies[0].nbytes
    dense_bf16 = [dense.to(torch.bfloat16)]
    del dense
    dense_bf16 += [
        torch.randn(n, k, device=gen.device, generator=gen, dtype=torch.bfloat16)
        for _ in range(min(8, -(-ROTATION_BYTES // (2 * n * k))) - 1)
    ]
    rows = []
    for m in m_values:
        x = x_all[:m]
        row: dict[str, object] = {
            "shape": label, "format": qtype.name, "n": n, "k": k, "m": m,
            "weight_bytes": nbytes, "floor_us": nbytes / copy_bw * 1e6,
            "tile": dataclasses.asdict(qm.dot_tile(m, qtype)) if m > 1 else None,
        }  # fmt: skip
        row["fused_us"] = graph_us([partial(quant_matmul, x, w, qtype, n, k) for w in copies])
        row["before_us"] = graph_us([partial(before_path, x, w, qtype) for w in copies])
        row["cublas_us"] = graph_us([partial(torch.matmul, x, w.T) for w in dense_bf16])
        row["fused_tflops"] = 2 * m * n * k / (row["fused_us"] * 1e-6) / 1e12
        rows.append(row)
    print(f"{label} {qtype.name} [{n}, {k}] timed", flush=True)
    return rows


def print_table(rows: list[dict[str, object]], copy_bw: float) -> None:
    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s; us per product; fused/before < 1 is a gain")
    print(
        f"{'shape':<14}{'fmt':<6}{'N':>7}{'K':>6}{'M':>5}{'floor':>8}{'fused':>9}{'before':>9}"
        f"{'cuBLAS':>9}{'f/b':>6}{'f/cuBLAS':>9}{'TFLOP/s':>8}"
    )
    for r in rows:
        print(
            f"{r['shape']:<14}{r['format']:<6}{r['n']:>7}{r['k']:>6}{r['m']:>5}"
            f"{r['floor_us']:>8.1f}{r['fused_us']:>9.1f}{r['before_us']:>9.1f}"
            f"{r['cublas_us']:>9.1f}{r['fused_us'] / r['before_us']:>6.2f}"
            f"{r['fused_us'] / r['cublas_us']:>9.2f}{r['fused_tflops']:>8.1f}"
        )


def sweep_candidates(m: int, qtype: GGMLQuantizationType) -> list:
    """The table's tile for m rows first, then its variations: rows of W by warps, and pipeline
    stages (two fit the shared memory with half-length steps, 4 groups, or up to 32 rows of x);
    at prefill sizes also tiles of 256 rows of x (half the dequantization a product)."""
    default = qm.dot_tile(m, qtype)
    staging = ((1, 8), (2, 4)) if default.bm > 32 else ((1, 8), (2, 4), (2, 8), (3, 8))
    candidates = [default]
    for (bn, warps), (stages, groups) in itertools.product(((64, 4), (128, 8), (128, 4)), staging):
        tile = dataclasses.replace(default, bn=bn, warps=warps, stages=stages, groups=groups)
        if tile not in candidates:
            candidates.append(tile)
    if m >= 256:
        candidates.append(dataclasses.replace(default, bm=256, bn=128, warps=8, stages=1))
    return candidates


def sweep_tiles(
    m_values: tuple[int, ...], gen: torch.Generator, copy_bw: float, failures: list[str]
) -> list[dict[str, object]]:
    """Time each M's tile candidates on four representative matrices; candidates that need
    more shared memory than the device has are skipped."""
    shapes = (LLAMA3_8B[0], LLAMA3_8B[2], LLAMA3_8B[4], GEMMA3_270M[3])
    results = []
    for label, n, k, qtype in shapes:
        copies = weight_copies(qtype, random_blocks(qtype, n, k, gen), n, k, gen)
        dense = dequantize_gpu(copies[0], qtype, n, k).double()
        for m in m_values:
            x = torch.randn(m, k, device=gen.device, generator=gen, dtype=torch.bfloat16)
            ref = x.double() @ dense.T
            timed = []
            for tile in sweep_candidates(m, qtype):
                try:
                    err = relative_error(quant_matmul(x, copies[0], qtype, n, k, tile=tile), ref)
                except OutOfResources:
                    continue
                if not err <= BOUND[torch.bfloat16]:
                    failures.append(f"{label} M={m} {tile}: relative error {err:.3g}")
                    continue
                us = graph_us([partial(quant_matmul, x, w, qtype, n, k, tile=tile) for w in copies])
                timed.append((us, tile))
            default = qm.dot_tile(m, qtype)
            default_us = next((us for us, tile in timed if tile == default), float("nan"))
            timed.sort(key=lambda t: t[0])
            print(f"M={m:<4}{label:<14}{qtype.name:<6} table's tile {default_us:8.1f} us; best:")
            for us, tile in timed[:3]:
                print(f"    {us:8.1f} us  {tile}", flush=True)
            results.append({
                "m": m, "shape": label, "format": qtype.name, "n": n, "k": k,
                "floor_us": copies[0].nbytes / copy_bw * 1e6, "table_us": default_us,
                "timed": [(us, dataclasses.asdict(tile)) for us, tile in timed],
            })  # fmt: skip
        del copies, dense
        torch.cuda.empty_cache()
    return results


def smoke() -> int:
    """Under TRITON_INTERPRET=1 on the CPU: the correctness part on tiny shapes, f16 x."""
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    for label, n, k, qtype in SMOKE_SHAPES:
        check_shape(label, n, k, qtype, SMOKE_M, gen, torch.float16, failures)
        x = torch.randn(20, k, generator=gen).to(torch.float16)
        packed = prepare_weight(random_blocks(qtype, n, k, gen), qtype, n, k)
        ref = x.double() @ dequantize_gpu(packed, qtype, n, k).double().T
        err = relative_error(before_path(x, packed, qtype), ref)
        if not err <= BOUND[torch.float16]:
            failures.append(f"{label}: the before path's relative error {err:.3g}")
    for failure in failures:
        print("FAIL", failure)
    print(f"smoke: {len(SMOKE_SHAPES)} shapes x M in {SMOKE_M}, {len(failures)} failures")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Batched products against quantized weights")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="rows of x to time")
    parser.add_argument(
        "--sweep", metavar="M,...", help="time tile candidates at these M instead (16,32,64,512)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter: correctness only")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
        return 2
    started = time.time()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    copy_bw = copy_bandwidth()
    failures: list[str] = []
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "copy_bandwidth_bytes_per_s": copy_bw,
        "max_fused_m": qm.MAX_FUSED_M,
        "tiles": {f"{b}/{t.name}": dataclasses.asdict(v) for (b, t), v in qm._DOT_TILES.items()},
    }  # fmt: skip
    if args.sweep:
        sweep_m = tuple(int(m) for m in args.sweep.split(","))
        result["sweep"] = sweep_tiles(sweep_m, gen, copy_bw, failures)
        name = "gpu_batched_matmul_sweep.json"
    else:
        m_values = tuple(int(m) for m in args.m.split(","))
        rows = []
        for label, n, k, qtype in LLAMA3_8B + GEMMA3_270M:
            rows += time_shape(label, n, k, qtype, m_values, gen, copy_bw, failures)
            torch.cuda.empty_cache()
        result["rows"] = rows
        name = "gpu_batched_matmul.json"
    result["failures"] = failures
    result["seconds"] = time.time() - started
    path = output_dir() / name
    path.write_text(json.dumps(result, indent=1))
    if not args.sweep:
        print_table(result["rows"], copy_bw)  # type: ignore[arg-type]
    for failure in failures:
        print("FAIL", failure)
    print(f"{len(failures)} check failures; {time.time() - started:.0f} s; JSON at {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
