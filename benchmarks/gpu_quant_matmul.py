"""How close do the quantized-matmul kernels come to the memory bandwidth, at Llama-3-8B shapes?

For each native ggml format and each (N, K) of a Llama-3-8B layer or its output head: random valid
blocks (finite scales of a realistic size) are checked first (every output against the f32
dequantized matrix, and dequantize_gpu bit-exact against metallic.quant.reference on a few rows),
then timed as a decode step runs them: calls captured back to back in a CUDA graph (no host
overhead), each on its own copy of the weights, with enough copies that they don't fit in the L2
(median per call over 20 replays). Decode (M = 1 and 8) reports weight bytes / time as a share of
a device-to-device copy measured in the same run; prefill (M = 512, quant_matmul's tiles of 128
rows) is compared with torch.matmul on a dense bf16 copy (gpu_batched_matmul.py covers all M).
Small odd shapes (K not a multiple of the step, N not a multiple of the row block, every M
regime, f16/bf16/f32 activations) are checked before any timing.

GPU only, never in CI:  python benchmarks/gpu_quant_matmul.py   (JSON to $OUT or benchmarks/results)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from gguf import GGMLQuantizationType

from metallic.kernels import PackedWeight, dequantize_gpu, prepare_weight, quant_matmul
from metallic.quant.formats import block_format
from metallic.quant.reference import dequantize

T = GGMLQuantizationType
FORMATS = (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096))
DECODE_M = (1, 8)
PREFILL_M = 512
# Byte offsets of the f16 scale fields in each block: random bytes there could be inf or NaN.
F16_FIELDS = {
    T.Q4_0: (0,),
    T.Q5_0: (0,),
    T.Q8_0: (0,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
# ||out - ref|| / ||ref|| allowed, by activation dtype (bf16 output rounding alone is ~1e-3).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
REFERENCE_ROWS = 64  # rows checked on the CPU against metallic.quant.reference
ROTATION_BYTES = 256 << 20  # weight copies per timing: at least this much, five L2s of an H100


def random_blocks(
    qtype: GGMLQuantizationType, n: int, k: int, gen: torch.Generator
) -> torch.Tensor:
    """Random valid raw blocks of an [n, k] matrix on gen's device, scales about 1e-3 as in real
    nets."""
    fmt = block_format(qtype)
    n_blocks = n * k // fmt.block_size
    shape = (n_blocks, fmt.type_size)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, device=gen.device, generator=gen)
    for offset in F16_FIELDS[qtype]:
        scale = torch.rand(n_blocks, device=gen.device, generator=gen) * 2e-3 + 1e-4
        raw[:, offset : offset + 2] = scale.to(torch.float16).view(torch.uint8).view(n_blocks, 2)
    return raw.view(-1)


def weight_copies(
    qtype: GGMLQuantizationType, raw: torch.Tensor, n: int, k: int, gen: torch.Generator
) -> list[PackedWeight]:
    """raw's packed weight, then packed fresh random blocks: together about ROTATION_BYTES (at
    most 16), so calls on them in turn read from DRAM, not the L2."""
    count = min(16, -(-ROTATION_BYTES // raw.numel()))
    fresh = (random_blocks(qtype, n, k, gen) for _ in range(count - 1))
    return [prepare_weight(r, qtype, n, k) for r in (raw, *fresh)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    return float("inf") if not torch.isfinite(err) else err.item()


def check(label: str, err: float, bound: float, failures: list[str]) -> None:
    if not err <= bound:
        failures.append(f"{label}: relative error {err:.3g} > {bound:g}")


def check_reference_rows(
    qtype: GGMLQuantizationType, raw: torch.Tensor, dense: torch.Tensor, k: int, failures: list[str]
) -> None:
    """dequantize_gpu's first and last rows bit-exact against the CPU reference."""
    row_bytes = k // block_format(qtype).block_size * block_format(qtype).type_size
    n = dense.shape[0]
    for first in (0, n - REFERENCE_ROWS):
        rows = raw[first * row_bytes : (first + REFERENCE_ROWS) * row_bytes].cpu()
        expected = dequantize(rows, qtype).view(REFERENCE_ROWS, k)
        if not torch.equal(dense[first : first + REFERENCE_ROWS].cpu(), expected):
            failures.append(f"{qtype.name} [{n}, {k}] rows {first}+: dequantize_gpu != reference")


def sanity_checks(gen: torch.Generator, failures: list[str]) -> None:
    """Odd shapes and every regime and activation dtype, before anything is timed."""
    for qtype in (*FORMATS, T.F16, T.BF16):
        fmt = block_format(qtype)
        k = 2816 if fmt.block_size == 256 else 1312  # a partial last step in every format
        n = 1000
        if qtype in (T.F16, T.BF16):
            dtype = torch.float16 if qtype == T.F16 else torch.bfloat16
            weight = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
            raw = weight.view(torch.uint8).view(-1)
        else:
            raw = random_blocks(qtype, n, k, gen)
        packed = prepare_weight(raw, qtype, n, k)
        dense = dequantize_gpu(packed, qtype, n, k)
        check_reference_rows(qtype, raw, dense, k, failures)
        cases = [(m, torch.bfloat16) for m in (1, 3, 8, 16, 40)]
        cases += [(m, dtype) for m in (1, 8) for dtype in (torch.float16, torch.float32)]
        for m, dtype in cases:
            x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
            out = quant_matmul(x, packed, qtype, n, k)
            ref = x.double() @ dense.double().T
            check(f"{qtype.name} [{n}, {k}] M={m} {dtype}", relative_error(out, ref),
                  TOLERANCE[dtype], failures)  # fmt: skip
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            out = quant_matmul(x, packed, qtype, n, k, steps_per_split=1)
            ref = x.double() @ dense.double().T
            check(f"{qtype.name} M={m} split per step", relative_error(out, ref),
                  TOLERANCE[torch.bfloat16], failures)  # fmt: skip


def graph_us(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Median microseconds per call, the calls replayed back to back from one CUDA graph."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    # Outside a graph: captured, the copy becomes a copy-engine node that moves only ~2.4 TB/s.
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench_format(
    qtype: GGMLQuantizationType, n: int, k: int, gen: torch.Generator, copy_bw: float,
    failures: list[str],
) -> dict[str, object]:  # fmt: skip
    raw = random_blocks(qtype, n, k, gen)
    copies = weight_copies(qtype, raw, n, k, gen)
    dense = dequantize_gpu(copies[0], qtype, n, k)
    check_reference_rows(qtype, raw, dense, k, failures)
    row: dict[str, object] = {"format": qtype.name, "n": n, "k": k, "weight_bytes": raw.numel()}
    for m in DECODE_M:
        x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        out = quant_matmul(x, copies[0], qtype, n, k)
        ref = x.float() @ dense.T
        check(f"{qtype.name} [{n}, {k}] M={m}", relative_error(out, ref), 1e-2, failures)
        us = graph_us([lambda x=x, w=w: quant_matmul(x, w, qtype, n, k) for w in copies])
        row[f"m{m}_us"] = us
        row[f"m{m}_copy_pct"] = 100 * raw.numel() / (us * 1e-6) / copy_bw
    del dense
    x = torch.randn(PREFILL_M, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    dense_bf16 = dequantize_gpu(copies[0], qtype, n, k, torch.bfloat16)
    out = quant_matmul(x, copies[0], qtype, n, k)
    ref = x.float() @ dense_bf16.float().T
    check(f"{qtype.name} [{n}, {k}] M={PREFILL_M}", relative_error(out, ref), 1e-2, failures)
    row["prefill_us"] = graph_us([lambda: quant_matmul(x, copies[0], qtype, n, k)])
    row["dense_bf16_prefill_us"] = graph_us([lambda: torch.matmul(x, dense_bf16.T)])
    row["dequant_bf16_us"] = graph_us(
        [lambda: dequantize_gpu(copies[0], qtype, n, k, torch.bfloat16)]
    )
    return row


def dense_baseline(n: int, k: int, gen: torch.Generator, copy_bw: float) -> dict[str, object]:
    """cuBLAS on a dense bf16 matrix at M = 1: what a plain library GEMV reaches here."""
    nbytes = n * k * 2
    weights = [
        torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        for _ in range(min(8, -(-ROTATION_BYTES // nbytes)))
    ]
    x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    us = graph_us([lambda w=w: torch.matmul(x, w.T) for w in weights])
    return {"format": "BF16 (torch)", "n": n, "k": k, "weight_bytes": nbytes, "m1_us": us,
            "m1_copy_pct": 100 * nbytes / (us * 1e-6) / copy_bw}  # fmt: skip


def output_dir() -> Path:
    out = os.environ.get("OUT")
    path = Path(out) if out else Path(__file__).resolve().parent / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_table(rows: list[dict[str, object]], copy_bw: float) -> None:
    print(f"\ncopy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s; decode % is of that")
    header = (
        f"{'format':<13}{'N':>7}{'K':>7}{'MB':>8}{'M=1 us':>9}{'%':>6}{'M=8 us':>9}{'%':>6}"
        f"{'pp512 us':>10}{'bf16 us':>9}{'deq us':>8}"
    )
    print(header)
    for r in rows:

        def cell(key: str, width: int, fmt: str = ".1f", r: dict[str, object] = r) -> str:
            value = r.get(key)
            return f"{value:>{width}{fmt}}" if isinstance(value, float) else " " * (width - 1) + "-"

        print(
            f"{r['format']:<13}{r['n']:>7}{r['k']:>7}{r['weight_bytes'] / 1e6:>8.1f}"
            f"{cell('m1_us', 9)}{cell('m1_copy_pct', 6, '.0f')}{cell('m8_us', 9)}"
            f"{cell('m8_copy_pct', 6, '.0f')}{cell('prefill_us', 10)}"
            f"{cell('dense_bf16_prefill_us', 9)}{cell('dequant_bf16_us', 8)}"
        )


def main() -> int:
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.time()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    sanity_checks(gen, failures)
    print(f"sanity checks: {len(failures)} failures ({time.time() - started:.0f} s)", flush=True)
    copy_bw = copy_bandwidth()
    rows = [dense_baseline(n, k, gen, copy_bw) for n, k in SHAPES]
    for qtype in FORMATS:
        for n, k in SHAPES:
            rows.append(bench_format(qtype, n, k, gen, copy_bw, failures))
            print(f"{qtype.name} [{n}, {k}] done ({time.time() - started:.0f} s)", flush=True)
            torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "rows": rows,
        "failures": failures,
        "seconds": time.time() - started,
    }
    path = output_dir() / "gpu_quant_matmul.json"
    path.write_text(json.dumps(result, indent=1))
    for failure in failures:
        print("FAIL", failure)
    print_table(rows, copy_bw)
    print(f"{len(failures)} check failures; {time.time() - started:.0f} s; JSON at {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
