"""The CUDA C one-row K-quant products (metallic.kernels.cuda_gemv) against the Triton kernels.

Correctness first: every variant against x W^T in float64 (W dequantized on the GPU, checked
bit-exact against metallic.quant.reference; x as rounded to int8, what both kernels multiply), and
the CUDA kernel against the Triton kernel's output. Then the product alone, replayed back to back
from one CUDA graph over enough weight copies to defeat the L2 (gpu_quant_matmul.py's method), with
programmatic dependent launch as in a decode step: the Triton dp4a default
(quant_gemv.default_geometry, its split sums included), the CUDA kernel at 1, 2 and 4 rows a block
and one, two or four turns a lane, the float kernel (quant_matmul at one row: what products under
quant_gemv.DP4A_MIN_BYTES take, Gemma's), both Triton kernels again with METALLIC_PREFETCH=1 (their
weights asked of the L2 before the wait; the dp4a one must give the same bits), and a plain
streaming read of the same bytes, as shares of a device-to-device copy's bandwidth measured in the
same run. Shapes: Llama-3-8B's products (Q4_K: q and o, k, gate|up in one launch, down; Q6_K: v,
down, the output head into f32) and Gemma 3 270M's attn_output (Q4_K, small: bound by latency, not
bytes).

What the kernels are worth to a whole decode step: `gpu_pdl.py --variable METALLIC_CUDA_GEMV`
(fresh processes with the switch off and on, tokens compared, tg128 timed).

GPU:   python benchmarks/gpu_cuda_gemv.py   (JSON to $OUT or benchmarks/results; exit 1 if a
       check fails)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

import torch
from common import copy_bandwidth, device_name, out_dir
from gguf import GGMLQuantizationType
from gpu_gemv import read_us
from gpu_quant_matmul import (
    ROTATION_BYTES,
    check_reference_rows,
    graph_us,
    random_blocks,
    relative_error,
)

from metallic.kernels import dequantize_gpu, prepare_weight, quant_matmul
from metallic.kernels.cuda_gemv import DEFAULT_ROWS, ROW_CHOICES, block_warps
from metallic.kernels.quant_gemv import Geometry, gemv_parts, quantize_x
from metallic.quant.formats import block_format

T = GGMLQuantizationType
TOLERANCE = 1e-2  # bf16 output against the float64 product with x as rounded
AGREEMENT = 2e-2  # relative difference of the two kernels' bf16 outputs (two roundings)
TURNS = (1, 2, 4)  # turns of eight super-blocks a lane: warps a block by block_warps
SHAPES = (  # (label, format, rows of each part, K, output dtype)
    ("8B q, o", T.Q4_K, (4096,), 4096, torch.bfloat16),
    ("8B k", T.Q4_K, (1024,), 4096, torch.bfloat16),
    ("8B gate|up", T.Q4_K, (14336, 14336), 4096, torch.bfloat16),
    ("8B down", T.Q4_K, (4096,), 14336, torch.bfloat16),
    ("8B v", T.Q6_K, (1024,), 4096, torch.bfloat16),
    ("8B down", T.Q6_K, (4096,), 14336, torch.bfloat16),
    ("8B output", T.Q6_K, (128256,), 4096, torch.float32),
    ("Gemma o", T.Q4_K, (640,), 1024, torch.bfloat16),
)


def bench_shape(
    label: str, qtype: GGMLQuantizationType, part_rows: tuple[int, ...], k: int,
    dtype: torch.dtype, gen: torch.Generator, copy_bw: float, failures: list[str],
) -> dict[str, object]:  # fmt: skip
    label = f"{label} {qtype.name}"
    n = sum(part_rows)
    one_copy = n * k // 256 * block_format(qtype).type_size
    count = max(1, min(16, -(-ROTATION_BYTES // one_copy)))
    raws = [[random_blocks(qtype, rows, k, gen) for rows in part_rows] for _ in range(count)]
    copies = [
        tuple(prepare_weight(r, qtype, rows, k) for r, rows in zip(c, part_rows, strict=True))
        for c in raws
    ]
    dense = torch.cat([dequantize_gpu(p, qtype, p.n, k) for p in copies[0]])
    check_reference_rows(qtype, raws[0][0], dense[: part_rows[0]], k, failures)
    x = torch.randn(k, device=gen.device, generator=gen, dtype=torch.bfloat16)
    xq = quantize_x(x)
    rounded = (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(1, k)
    exact = rounded @ dense.double().T
    del dense
    # name -> (geometry, METALLIC_PREFETCH): "pf" variants ask the L2 before the PDL wait
    variants: dict[str, tuple[Geometry | None, bool]] = {"triton": (None, False),
                                                         "triton pf": (None, True)}  # fmt: skip
    for rows in ROW_CHOICES:
        for turns in TURNS:
            warps = block_warps(k, turns)
            geometry = Geometry(rows, 8, warps=warps, kernel="cuda")
            variants.setdefault(f"cuda r{rows} w{warps}", (geometry, False))
    outputs = {}
    row: dict[str, object] = {"shape": label, "n": n, "k": k, "weight_bytes": one_copy}
    for name, (geometry, prefetch) in variants.items():
        out = torch.full((1, n), float("nan"), device=gen.device, dtype=dtype)
        with prefetching(prefetch):
            try:
                gemv_parts(xq, copies[0], out, geometry)
            except Exception as error:  # a variant that fails: report it, time the others
                failures.append(f"{label} {name}: {str(error).splitlines()[-1][:200]}")
                continue
            err = relative_error(out, exact)
            row[f"{name} err"] = err
            if not err <= TOLERANCE:
                failures.append(f"{label} {name}: relative error {err:.3g} vs rounded x")
                continue
            outputs[name] = out
            calls = [lambda c=c, g=geometry, o=out: gemv_parts(xq, c, o, g) for c in copies]
            us = graph_us(calls)
        row[f"{name} us"] = us
        row[f"{name} pct"] = 100 * one_copy / (us * 1e-6) / copy_bw
    for name, out in outputs.items():
        if name != "triton" and "triton" in outputs:
            diff = relative_error(out, outputs["triton"])
            row[f"{name} vs triton"] = diff
            if not diff <= AGREEMENT:
                failures.append(f"{label} {name}: {diff:.3g} from the Triton kernel")
            elif name == "triton pf" and not torch.equal(out, outputs["triton"]):
                failures.append(f"{label} {name}: not the Triton kernel's bits ({diff:.3g})")
    if len(part_rows) == 1:  # the float kernel (quant_matmul, M = 1: bf16 x, no rounding)
        xs = x.view(1, k)
        for name, prefetch in (("float", False), ("float pf", True)):
            with prefetching(prefetch):
                us = graph_us([lambda c=c: quant_matmul(xs, c[0], qtype, n, k) for c in copies])
            row[f"{name} us"], row[f"{name} pct"] = us, 100 * one_copy / (us * 1e-6) / copy_bw
    read = read_us([torch.cat([r.view(-1) for r in c]) for c in raws])
    row["read us"], row["read pct"] = read, 100 * one_copy / (read * 1e-6) / copy_bw
    return row


@contextlib.contextmanager
def prefetching(on: bool) -> Iterator[None]:
    """METALLIC_PREFETCH set to `on` inside (read at each launch, so at a graph's capture)."""
    before = os.environ.get("METALLIC_PREFETCH")
    os.environ["METALLIC_PREFETCH"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["METALLIC_PREFETCH"]
        else:
            os.environ["METALLIC_PREFETCH"] = before


def cell(row: dict[str, object], name: str) -> str:
    """A variant's time and share of copy bandwidth, or "-" where it failed."""
    us, pct = row.get(f"{name} us"), row.get(f"{name} pct")
    return f"{us:.2f} ({pct:.0f}%)" if us is not None else "-"


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        print("gpu_cuda_gemv.py needs a CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_bw = copy_bandwidth()
    failures: list[str] = []
    rows = [bench_shape(*shape, gen, copy_bw, failures) for shape in SHAPES]
    print(f"\ncopy bandwidth {copy_bw / 1e9:,.0f} GB/s; µs (share of copy bandwidth)")
    print("| shape | N x K | MB | Triton dp4a | + prefetch | CUDA default | CUDA best | float | "
          "+ prefetch | plain read |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mb = row["weight_bytes"] / 1e6
        timed = sorted((row[key], key[:-3]) for key in row if key.startswith("cuda") and
                       key.endswith(" us"))  # fmt: skip
        best = f"{cell(row, timed[0][1])} {timed[0][1][5:]}" if timed else "-"
        default = f"cuda r{DEFAULT_ROWS} w{block_warps(row['k'])}"
        print(
            f"| {row['shape']} | {row['n']} x {row['k']} | {mb:.1f} | {cell(row, 'triton')} | "
            f"{cell(row, 'triton pf')} | {cell(row, default)} | {best} | {cell(row, 'float')} | "
            f"{cell(row, 'float pf')} | {cell(row, 'read')} |"
        )
    path = out_dir() / "cuda-gemv.json"
    doc = {"device": device_name(torch.device("cuda")), "copy_bandwidth": copy_bw, "rows": rows,
           "failures": failures}  # fmt: skip
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {path}")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
