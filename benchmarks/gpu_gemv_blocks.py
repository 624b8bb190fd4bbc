"""The dp4a block-format decode kernels (metallic.kernels.gemv_blocks) at Gemma 3 270M's shapes,
1 to 8 rows of x: correctness first, then time against today's float kernel.

Correctness, at the full shapes: every M against x W^T in float64 (W dequantized on the GPU,
itself checked bit-exact against metallic.quant.reference on 2 x 64 rows; x as rounded to int8,
what the kernel multiplies), and batch invariance: each row's f32 result bitwise the same alone
as among M rows. Timing (gpu_quant_matmul.py's method: calls replayed from one CUDA graph over
weight copies that defeat the L2): the product alone (x rounded once outside), with x's rounding,
quant_matmul at the same M (the path these matrices take today) and a plain streaming read of
the same bytes, as shares of a device-to-device copy's bandwidth; then a short geometry sweep
for the output head.

GPU:   python benchmarks/gpu_gemv_blocks.py          (about 2 minutes; JSON to $OUT or
                                                      benchmarks/results)
CPU:   TRITON_INTERPRET=1 python benchmarks/gpu_gemv_blocks.py --smoke   (correctness, small)
any:   python benchmarks/gpu_gemv_blocks.py --sass   (sm_90 instructions per weight, no GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from gpu_gemv import read_us
from gpu_quant_matmul import (
    ROTATION_BYTES,
    check_reference_rows,
    copy_bandwidth,
    graph_us,
    random_blocks,
    relative_error,
)

from metallic.kernels import dequantize_gpu, prepare_weight, quant_matmul
from metallic.kernels.gemv_blocks import (
    Geometry,
    _block_gemv_kernel,
    block_gemv,
    default_geometry,
    normalized,
)
from metallic.kernels.quant_gemv import quantize_x
from metallic.quant.reference import dequantize

T = GGMLQuantizationType
SHAPES = (
    (T.Q8_0, 262144, 640),  # token_embd as the output head
    (T.Q5_0, 4096, 640),  # ffn gate|up stacked
    (T.Q5_0, 1024, 640),  # attn_q
    (T.Q5_0, 256, 640),  # attn_k
    (T.Q8_0, 256, 640),  # attn_v
    (T.Q4_0, 4096, 640),  # Q4_0 models (none in Gemma 3 270M Q4_K_M)
)
SMOKE_SHAPES = ((T.Q8_0, 37, 640), (T.Q5_0, 37, 640), (T.Q4_0, 37, 640), (T.Q5_0, 9, 1024))
MS = (1, 2, 4, 8)
HEAD_SWEEP = (
    Geometry(64, 4, 1, 4), Geometry(128, 4, 1, 4), Geometry(256, 4, 1, 4), Geometry(256, 4, 1, 8),
    Geometry(32, 4, 1, 1), Geometry(128, 2, 1, 2), Geometry(16, 4, 1, 1, False),
)  # fmt: skip
SMALL_SWEEP = (
    Geometry(32, 4, 1, 4), Geometry(32, 4, 5, 4), Geometry(16, 4, 5, 2), Geometry(64, 4, 5, 2),
    Geometry(8, 4, 5, 1), Geometry(8, 4, 5, 1, False),
)  # fmt: skip
TOLERANCE = 1e-2  # bf16 output against the float64 product with x as rounded


def _rounded(xq: tuple, m: int, k: int) -> torch.Tensor:
    """x [m, k] as block_gemv multiplies it, in float64."""
    return (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(m, k)


def check_shape(
    label: str, packed, dense: torch.Tensor, x: torch.Tensor, geometries: list[Geometry | None],
    failures: list[str],
) -> dict[str, float]:  # fmt: skip
    """Every M (the default geometry; the others at M = 1 and 8) against float64, and each
    row's bits alone and among fewer rows against the batch's; the worst relative error by M."""
    m_max, k = x.shape
    xq = quantize_x(x.reshape(-1))
    exact = _rounded(xq, m_max, k) @ dense.T
    worst: dict[str, float] = {}
    for g in geometries:
        name = f"{label} {g or 'default'}"
        batch = block_gemv(xq, packed, torch.empty(m_max, packed.n, device=x.device), g)
        for m in MS if g is None else (1, m_max):
            xm = quantize_x(x[:m].reshape(-1))
            out = block_gemv(xm, packed, torch.empty(m, packed.n, device=x.device,
                                                     dtype=torch.bfloat16), g)  # fmt: skip
            err = relative_error(out, exact[:m])
            worst[str(m)] = max(worst.get(str(m), 0.0), err)
            if not err <= TOLERANCE:
                failures.append(f"{name} M={m}: relative error {err:.3g} vs rounded x")
            f32 = block_gemv(xm, packed, torch.empty(m, packed.n, device=x.device), g)
            if not torch.equal(f32, batch[:m]):
                failures.append(f"{name} M={m}: rows differ from the same rows among {m_max}")
        alone = block_gemv(quantize_x(x[-1]), packed, torch.empty(1, packed.n, device=x.device), g)
        if not torch.equal(alone[0], batch[-1]):
            failures.append(f"{name}: row {m_max - 1} alone differs from it among {m_max}")
    return worst


def smoke() -> int:
    """Every format and a few geometries at small shapes on the CPU (under TRITON_INTERPRET=1)."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    for qtype, n, k in SMOKE_SHAPES:
        raw = random_blocks(qtype, n, k, gen)
        dense = dequantize(raw, qtype, n * k).view(n, k).double()
        x = torch.randn(8, k, generator=gen)
        label = f"{qtype.name} [{n}, {k}]"
        geometries = [None, Geometry(8, 2, 2, 1)]
        worst = check_shape(label, prepare_weight(raw, qtype, n, k), dense, x, geometries,
                            failures)  # fmt: skip
        print(f"{label}: worst relative error by M {worst}", flush=True)
    for failure in failures:
        print("FAIL", failure)
    print(f"seed {gen.initial_seed()}")
    return 1 if failures else 0


def sass_counts() -> list[dict[str, object]]:
    """sm_90 instructions per weight in the main loop, by format and M, at the output head's
    default geometry (benchmarks/sass.py compiles and counts; the Triton that runs this)."""
    from sass import Variant, count, sass

    signature = {"qs_ptr": "*i32", "qh_ptr": "*i32", "d_ptr": "*fp16", "xq_ptr": "*i32",
                 "dx_ptr": "*fp32", "xs_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32",
                 "nb": "i32", "stride_om": "i32", "blocks_per_split": "i32"}  # fmt: skip
    rows = []
    for geometry in (default_geometry(262144, 640), default_geometry(1024, 640)):
        g = normalized(geometry, 640)
        for qtype, fmt in ((T.Q8_0, 0), (T.Q5_0, 1), (T.Q4_0, 2)):
            for m in (1, 8):
                constexprs = {"FMT": fmt, "M": m, "BN": g.rows, "S": g.blocks,
                              "BLOCKS_FIRST": g.blocks_first, "PARTIAL": False, "ASM": True,
                              "PDL": True}  # fmt: skip
                v = Variant(f"{qtype.name} M={m} {g}", _block_gemv_kernel,
                            signature | {c: "constexpr" for c in constexprs}, constexprs,
                            g.warps, g.rows * g.blocks * 32)  # fmt: skip
                text, regs = sass(v)
                c = count(text)
                per_thread = v.weights / (32 * v.num_warps)
                rows.append({"kernel": v.name, **c, "regs": regs,
                             "per_weight": round(c["loop"] / per_thread, 2)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def time_m(copies: list, xm: torch.Tensor, sweep: tuple[Geometry, ...]) -> dict[str, object]:
    """µs per product of M = xm's rows against the weight copies in turn: block_gemv alone
    (default geometry, then each of `sweep`), with x's rounding, and quant_matmul."""
    w0 = copies[0]
    xq = quantize_x(xm.reshape(-1))
    out = torch.empty(xm.shape[0], w0.n, device="cuda", dtype=torch.bfloat16)
    block_gemv(xq, w0, out)
    row: dict[str, object] = {"out": out.clone()}
    row["dp4a_us"] = graph_us([lambda w=w: block_gemv(xq, w, out) for w in copies])
    row["dp4a_rounding_us"] = graph_us(
        [lambda w=w: block_gemv(quantize_x(xm.reshape(-1)), w, out) for w in copies]
    )
    row["float_us"] = graph_us(
        [lambda w=w: quant_matmul(xm, w, w0.ggml_type, w0.n, w0.k) for w in copies]
    )
    timed = [(graph_us([lambda w=w, g=g: block_gemv(xq, w, out, g) for w in copies]),
              str(normalized(g, w0.k))) for g in sweep]  # fmt: skip
    if timed:
        row["sweep"] = sorted(timed)
    return row


def bench_shape(
    qtype: GGMLQuantizationType, n: int, k: int, gen: torch.Generator, copy_bw: float,
    failures: list[str],
) -> list[dict[str, object]]:  # fmt: skip
    raw = random_blocks(qtype, n, k, gen)
    count = min(16, -(-ROTATION_BYTES // raw.numel()))
    raws = [raw] + [random_blocks(qtype, n, k, gen) for _ in range(count - 1)]
    copies = [prepare_weight(r, qtype, n, k) for r in raws]
    dense = dequantize_gpu(copies[0], qtype, n, k)
    check_reference_rows(qtype, raw, dense, k, failures)
    x = torch.randn(max(MS), k, device="cuda", generator=gen, dtype=torch.bfloat16)
    label = f"{qtype.name} [{n}, {k}]"
    sweep = HEAD_SWEEP if n >= 65536 else SMALL_SWEEP
    check_shape(label, copies[0], dense.double(), x.float(), [None, *sweep], failures)
    ref = x.double() @ dense.double().T
    del dense
    read = read_us(raws)
    rows = []
    for m in MS:
        row = time_m(copies, x[:m].contiguous(), sweep if m in (1, 8) else ())
        row |= {"format": qtype.name, "n": n, "k": k, "m": m, "weight_bytes": raw.numel(),
                "read_us": read, "err_vs_x": relative_error(row.pop("out"), ref[:m]),
                "default": str(normalized(default_geometry(n, k), k))}  # fmt: skip
        for key in ("read", "dp4a", "dp4a_rounding", "float"):
            row[f"{key}_copy_pct"] = 100 * raw.numel() / (row[f"{key}_us"] * 1e-6) / copy_bw
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes on the CPU only")
    parser.add_argument("--sass", action="store_true", help="count sm_90 instructions only")
    parser.add_argument("--only", default="", help="shapes whose 'TYPE NxK' contains this")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if args.sass:
        sass_counts()
        return 0
    start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    print(f"{device}: copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    failures: list[str] = []
    results = []
    for qtype, n, k in SHAPES:
        if args.only not in f"{qtype.name} {n}x{k}":
            continue
        try:
            results += bench_shape(qtype, n, k, gen, copy_bw, failures)
        except Exception as error:  # one shape's failure must not lose the others
            failures.append(f"{qtype.name} [{n}, {k}]: {error!r}"[:300])
            continue
        print(f"{qtype.name} {n}x{k} done ({time.time() - start:.0f} s)", flush=True)
    print(f"\n{device}, copy {copy_bw / 1e12:.2f} TB/s; µs per product (% of copy bandwidth)")
    print("| format | N x K | MB | M | read | float (today) | dp4a | dp4a + round | float/dp4a |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[f'{key}_us']:.1f} ({r[f'{key}_copy_pct']:.0f}%)"
                 for key in ("read", "float", "dp4a", "dp4a_rounding")]  # fmt: skip
        print(f"| {r['format']} | {r['n']}x{r['k']} | {r['weight_bytes'] / 1e6:.1f} | {r['m']} | "
              + " | ".join(cells) + f" | {r['float_us'] / r['dp4a_us']:.2f} |")  # fmt: skip
    for r in results:
        if "sweep" in r:
            best = ", ".join(f"{us:.1f} {g}" for us, g in r["sweep"][:3])
            print(f"{r['format']} {r['n']}x{r['k']} M={r['m']} default {r['default']}: {best}")
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "copy_bw": copy_bw, "results": results, "failures": failures}
    (out_dir / "gpu_gemv_blocks.json").write_text(json.dumps(result, indent=1))
    for failure in failures:
        print("FAIL", failure)
    print(f"{time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
