"""The prefill GEMM (kernels/quant_gemm.py) against today's prompt path, at Llama-3-8B shapes.

For each Q4_K / Q6_K matrix of the 8B (and Gemma 3 270M's ffn_down; see SHAPES): random valid
blocks are checked first (quant_gemm at M = 512 against the f64 product of the dequantized matrix,
and against today's path), then timed at M = 64, 128, 512, 2048, each call alone from a CUDA
graph (median of 20 replays):

- ``gemm``: quant_gemm with each candidate tile (a sweep at M = 512, the best few at other M);
- ``today``: dequantize_gpu into a bf16 scratch + torch.matmul (ops.linear's path before it);
- ``cublas``: torch.matmul on the pre-dequantized bf16 matrix (what dequantizing in the tiles
  can at best approach);
- ``fused`` (M <= MAX_FUSED_M): quant_matmul, today's path there for large matrices.

Prints TFLOPS per shape and M, the best tile per format, and writes JSON to $OUT (or
benchmarks/results). GPU only, never in CI:

    python benchmarks/gpu_quant_gemm.py            # the full run (about 3 minutes on an H200)
    python benchmarks/gpu_quant_gemm.py --quick    # default tiles only, no sweep
    TRITON_INTERPRET=1 python benchmarks/gpu_quant_gemm.py --smoke   # tiny shapes, CPU, no timing
    python benchmarks/gpu_quant_gemm.py --layer-8b  # an 8B layer's products, plans (~3 minutes)

``--layer-8b`` times the products of one Llama-3-8B layer as ops.linear makes them (LAYER_8B:
q|k|v all Q4_K, or q|k Q4_K with v Q6_K; attn_output; gate|up; ffn_down in either format) at
M = 256, 512, 1024: ops.linear's path today, dequantize + cuBLAS, cuBLAS alone on the widened
matrix, quant_gemm's default plan, and candidate plans (LAYER_TILES x schedules: one program per
tile, K in two, stream-K with one or two programs per SM), each checked against float64 first
(and launched twice: the same bits). It prints a table, the layer's total per M, and the
GEMM_PLANS entries of the winners, and writes gpu_quant_gemm_layer8b.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import torch
import triton
from gguf import GGMLQuantizationType
from gpu_quant_matmul import graph_us, output_dir, random_blocks, relative_error

from metallic.kernels import MAX_FUSED_M, dequantize_gpu, prepare_weight, quant_matmul
from metallic.kernels.quant_gemm import (
    GemmPlan,
    GemmTile,
    default_tile,
    gemm_plan,
    quant_gemm,
    quant_gemm_parts,
)
from metallic.kernels.quant_matmul import sm_count
from metallic.ops.linear import _native_linear

qg = importlib.import_module("metallic.kernels.quant_gemm")

T = GGMLQuantizationType
# (format, N, K): the 8B's parts as ops.linear runs them (q|k|v stacked per run of one format:
# q|k|v all Q4_K, or q|k Q4_K and v Q6_K; attn_output; gate|up; ffn_down either format), and
# q and k|v alone; its output head (Q6_K [128256, 4096]) runs one row at a time in prefill.
# Gemma 3 270M: ffn_down, its one K-quant shape with K a multiple of 256.
SHAPES = (
    (T.Q4_K, 6144, 4096),
    (T.Q4_K, 5120, 4096),
    (T.Q4_K, 4096, 4096),
    (T.Q4_K, 1024, 4096),
    (T.Q4_K, 28672, 4096),
    (T.Q4_K, 4096, 14336),
    (T.Q6_K, 1024, 4096),
    (T.Q6_K, 4096, 14336),
    (T.Q4_K, 640, 2048),
    (T.Q6_K, 640, 2048),
)
SWEEP_M = 512
OTHER_M = (64, 128, 2048)
TOP_TILES = 4  # tiles from the M = 512 sweep also timed at the other M
# Candidates: each compiles for sm_90 under Triton 3.6 (the GPU's) without spills, within an
# H200's shared memory (Q6_K's 256x64x128/s3 excepted, skipped). W as the B operand (w_as_b):
# Triton waits for each wgmma before the next step's weights overwrite its shared-memory tile,
# so dequantizing and multiplying overlap only across CTAs: the tiles of <= 128 registers a
# thread (8 warps) or 4 warps run 2 CTAs per SM. W as the A operand: wgmma groups stay in
# flight across steps (pendings = 7), unless ptxas serializes them (C7515, marked *).
CANDIDATES = tuple(
    GemmTile(bm, bn, bk, warps, stages, w_as_b)
    for bm, bn, bk, warps, stages, w_as_b in (
        (256, 128, 64, 8, 3, True),
        (256, 128, 64, 8, 4, True),
        (256, 128, 128, 8, 2, True),
        (128, 128, 128, 8, 3, True),
        (128, 128, 64, 8, 3, True),
        (128, 128, 64, 8, 2, True),
        (128, 64, 128, 8, 3, True),
        (128, 64, 128, 8, 2, True),
        (256, 64, 64, 4, 2, True),
        (256, 64, 64, 4, 3, True),
        (128, 64, 64, 4, 3, True),
        (64, 128, 128, 8, 3, True),
        (128, 256, 64, 8, 3, True),
        (256, 64, 128, 8, 3, False),  # run 1's best for Q4_K
        (256, 64, 128, 8, 2, False),
        (128, 64, 128, 8, 2, False),
        (256, 128, 64, 8, 3, False),  # *
        (128, 128, 128, 8, 3, False),  # *
        (64, 64, 128, 8, 3, False),
    )
)
TOLERANCE = 1e-2  # bf16 output (and weight) rounding is ~3e-3 of the product's norm


def tile_name(tile: GemmTile) -> str:
    operands = "/wB" if tile.w_as_b else ""
    return f"{tile.bm}x{tile.bn}x{tile.bk}/w{tile.warps}/s{tile.stages}{operands}"


def flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def check_shape(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    m: int,
    gen: torch.Generator,
    tiles: tuple[GemmTile, ...],
    failures: list[str],
) -> None:
    """quant_gemm with every tile against the f64 product and against today's path."""
    device = gen.device
    packed = prepare_weight(random_blocks(qtype, n, k, gen), qtype, n, k)
    dense = dequantize_gpu(packed, qtype, n, k)  # f32, bit-exact against the reference
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    ref = x.double() @ dense.double().T
    today = relative_error(x @ dense.to(torch.bfloat16).T, ref)
    for tile in tiles:
        try:
            err = relative_error(quant_gemm(x, packed, tile=tile), ref)
        except Exception as exc:  # a tile that fails to build or launch is skipped
            name = f"{qtype.name} [{n}, {k}] {tile_name(tile)}"
            print(f"  {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        if not (err <= TOLERANCE and err <= 2 * today):
            failures.append(
                f"{qtype.name} [{n}, {k}] M={m} {tile_name(tile)}: error {err:.3g} "
                f"(today's path {today:.3g})"
            )


def time_shape(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    gen: torch.Generator,
    sweep: tuple[GemmTile, ...],
) -> dict[str, object]:
    """Microseconds of every path at every M; the gemm at M = SWEEP_M with every tile."""
    packed = prepare_weight(random_blocks(qtype, n, k, gen), qtype, n, k)
    dense = dequantize_gpu(packed, qtype, n, k, torch.bfloat16)
    scratch = torch.empty_like(dense)
    row: dict[str, object] = {"format": qtype.name, "n": n, "k": k, "by_m": {}}
    tiles_at_m = {SWEEP_M: sweep}
    for m in (SWEEP_M, *OTHER_M):
        x = torch.randn(m, k, device=gen.device, generator=gen).to(torch.bfloat16)
        out = torch.empty(m, n, device=gen.device, dtype=torch.bfloat16)
        entry: dict[str, object] = {
            "cublas_us": graph_us([lambda x=x: torch.matmul(x, dense.T)]),
            "today_us": graph_us(
                [lambda x=x: torch.matmul(x, dequantize_gpu(packed, qtype, n, k, out=scratch).T)]
            ),
        }
        if m <= MAX_FUSED_M:  # the fused kernel's range today (quant_matmul's DOT mode)
            entry["fused_us"] = graph_us(
                [lambda x=x, o=out: quant_matmul(x, packed, qtype, n, k, out=o)]
            )
        tiles = tiles_at_m.get(m)
        if tiles is None:  # the sweep's best few, the default (to 128 rows, 64-row tiles too)
            ranked = sorted(row["by_m"][SWEEP_M]["gemm_us"].items(), key=lambda kv: kv[1])
            ranked = ranked or [(tile_name(default_tile(m)), 0.0)]
            names = [name for name, _ in ranked[:TOP_TILES]]
            tiles = tuple(t for t in sweep if tile_name(t) in names or t.bm < 128 >= m)
            if default_tile(m) not in tiles:
                tiles += (default_tile(m),)
        gemm: dict[str, float] = {}
        for tile in tiles:
            try:
                gemm[tile_name(tile)] = graph_us(
                    [lambda x=x, t=tile, o=out: quant_gemm(x, packed, tile=t, out=o)]
                )
            except Exception as exc:  # skipped, as in check_shape
                print(f"  {tile_name(tile)}: {type(exc).__name__}", flush=True)
        entry["gemm_us"] = gemm
        best = min(gemm, key=gemm.get) if gemm else None
        entry["best_tile"], entry["best_us"] = best, gemm.get(best)
        entry["default_us"] = gemm.get(tile_name(default_tile(m)))
        for key in ("cublas_us", "today_us", "fused_us", "best_us", "default_us"):
            if entry.get(key):
                entry[key.replace("_us", "_tflops")] = flops(m, n, k) / entry[key] / 1e6
        row["by_m"][m] = entry
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    print(f"\n{'format':<6}{'N':>7}{'K':>7}{'M':>6}{'gemm us':>9}{'TFLOPS':>8}{'today us':>10}"
          f"{'TFLOPS':>8}{'cuBLAS us':>10}{'TFLOPS':>8}{'x today':>8}{'fused us':>9}"
          "  best tile")  # fmt: skip
    for r in rows:
        for m, e in sorted(r["by_m"].items()):
            if e["best_us"] is None:
                print(f"{r['format']:<6}{r['n']:>7}{r['k']:>7}{m:>6}  no tile ran")
                continue
            print(
                f"{r['format']:<6}{r['n']:>7}{r['k']:>7}{m:>6}{e['best_us']:>9.1f}"
                f"{e['best_tflops']:>8.0f}{e['today_us']:>10.1f}{e['today_tflops']:>8.0f}"
                f"{e['cublas_us']:>10.1f}{e['cublas_tflops']:>8.0f}"
                f"{e['today_us'] / e['best_us']:>8.2f}{e.get('fused_us', float('nan')):>9.1f}"
                f"  {e['best_tile']}"
            )


def best_tiles(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Per format: the total M = SWEEP_M time of the 8B's shapes for each tile, best first."""
    totals: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["k"] < 4096:
            continue
        for name, us in r["by_m"][SWEEP_M]["gemm_us"].items():
            fmt = totals.setdefault(r["format"], {})
            fmt[name] = fmt.get(name, 0.0) + us
    return {f: dict(sorted(t.items(), key=lambda kv: kv[1])) for f, t in totals.items()}


def smoke() -> int:
    """Tiny shapes on the CPU under TRITON_INTERPRET=1: correctness of small tiles only."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    tiles = (GemmTile(16, 32, 64, 4, 2), GemmTile(32, 16, 256, 4, 2))
    for qtype in (T.Q4_K, T.Q6_K):
        check_shape(qtype, 48, 512, 24, gen, tiles, failures)
    print("\n".join(failures) or "smoke: all correct")
    return 1 if failures else 0


# One 8B layer's prompt products: (name, parts (format, rows), k).
LAYER_8B = (
    ("q|k|v", ((T.Q4_K, 6144),), 4096),
    ("q|k + v", ((T.Q4_K, 5120), (T.Q6_K, 1024)), 4096),
    ("attn_out", ((T.Q4_K, 4096),), 4096),
    ("gate|up", ((T.Q4_K, 28672),), 4096),
    ("down Q4_K", ((T.Q4_K, 4096),), 14336),
    ("down Q6_K", ((T.Q6_K, 4096),), 14336),
)
LAYER_M = (256, 512, 1024)
# Tiles of the plans tried (each compiles under Triton 3.6 for sm_90 without spills in its main
# loop): today's default; 128 x 128 held to 128 registers (two CTAs of 8 warps a SM: one
# dequantizes while the other's wgmma runs); 4 warps (two CTAs a SM at 255 registers); run 2's
# best on gate|up and attn_output at 512 rows (W as the A operand).
LAYER_TILES = (
    GemmTile(256, 128, 64, 8, 3, True),
    GemmTile(128, 128, 64, 8, 3, True, registers=128),
    GemmTile(128, 64, 64, 4, 3, True),
    GemmTile(256, 64, 128, 8, 2, False),
)


def plan_name(plan: GemmPlan) -> str:
    regs = f"/r{plan.tile.registers}" if plan.tile.registers else ""
    if plan.stream:
        how = f"stream{plan.per_sm}"
    else:
        how = f"split{plan.splits}" if plan.splits else "auto"
    return f"{tile_name(plan.tile)}{regs} {how}"


def layer_plans(m: int, parts, k: int) -> list[GemmPlan]:
    """The candidate plans for one product, one per distinct (tile, schedule)."""
    sms = sm_count(parts[0].device)
    n = sum(p.n for p in parts)
    seen, plans = set(), []
    for tile in LAYER_TILES:
        two_ctas = tile.registers == 128 or tile.warps == 4
        candidates = [GemmPlan(tile), GemmPlan(tile, splits=1), GemmPlan(tile, splits=2),
                      GemmPlan(tile, stream=True)]  # fmt: skip
        if two_ctas:
            candidates.append(GemmPlan(tile, stream=True, per_sm=2))
        tiles = sum(triton.cdiv(m, tile.bm) * triton.cdiv(p.n, tile.bn) for p in parts)
        for plan in candidates:
            schedule = qg._schedule(plan, tiles, k // tile.bk, 4 * m * n, sms)
            if (tile, schedule) not in seen:
                seen.add((tile, schedule))
                plans.append(plan)
    return plans


def layer_product(
    name: str, formats, k: int, gen: torch.Generator, failures: list[str]
) -> dict[str, object]:
    """Check, then time, every path and plan of one product at every LAYER_M."""
    parts = [prepare_weight(random_blocks(q, n, k, gen), q, n, k) for q, n in formats]
    dense = torch.cat([dequantize_gpu(p, p.ggml_type, p.n, p.k) for p in parts])  # f32, exact
    dense16 = dense.to(torch.bfloat16)
    scratch = torch.empty_like(dense16)
    n = dense.shape[0]

    def widen(x: torch.Tensor) -> torch.Tensor:
        first = 0
        for p in parts:
            dequantize_gpu(p, p.ggml_type, p.n, p.k, out=scratch[first : first + p.n])
            first += p.n
        return x @ scratch.T

    row: dict[str, object] = {"product": name, "n": n, "k": k, "by_m": {}}
    row["formats"] = "+".join(q.name for q, _ in formats)
    for m in LAYER_M:
        x = torch.randn(m, k, device=gen.device, generator=gen).to(torch.bfloat16)
        ref = x.double() @ dense.double().T
        widen_err = relative_error(x @ dense16.T, ref)
        out = torch.empty(m, n, device=gen.device, dtype=torch.bfloat16)
        plans = {"default": gemm_plan(m, parts)}
        plans.update((plan_name(p), p) for p in layer_plans(m, parts, k))
        entry: dict[str, object] = {
            "today_us": graph_us([lambda x=x: _native_linear(x, tuple(parts))]),
            "widen_us": graph_us([lambda x=x: widen(x)]),
            "cublas_us": graph_us([lambda x=x: x @ dense16.T]),
            "plans_us": {},
        }
        today_err = relative_error(_native_linear(x, tuple(parts)), ref)
        for label, plan in plans.items():
            try:
                got = quant_gemm_parts(x, parts, plan=plan).clone()
                again = quant_gemm_parts(x, parts, plan=plan)
            except Exception as exc:  # a plan that fails to build or launch is skipped
                print(f"  {name} M={m} {label}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            err = relative_error(got, ref)
            if not (err <= TOLERANCE and err <= 2 * widen_err and torch.equal(got, again)):
                failures.append(
                    f"{name} M={m} {label}: error {err:.3g} (widened: "
                    f"{widen_err:.3g}), same bits twice: {torch.equal(got, again)}"
                )
                continue
            entry["plans_us"][label] = graph_us(
                [lambda x=x, p=plan, o=out: quant_gemm_parts(x, parts, plan=p, out=o)]
            )
        if not today_err <= TOLERANCE:
            failures.append(f"{name} M={m} today's path: error {today_err:.3g}")
        timed = {k: v for k, v in entry["plans_us"].items() if k != "default"}
        best = min(timed, key=timed.get) if timed else None
        entry["best"], entry["best_us"] = best, timed.get(best)
        entry["best_plan"] = repr(plans[best]) if best else None
        entry["default_us"] = entry["plans_us"].get("default")
        row["by_m"][m] = entry
    return row


def print_layer(rows: list[dict[str, object]]) -> None:
    print(f"\n{'product':<11}{'M':>5}{'today':>8}{'widen':>8}{'cuBLAS':>8}{'default':>8}"
          f"{'best':>8}{'TFLOPS':>7}{'x today':>8}  best plan")  # fmt: skip
    totals: dict[int, dict[str, float]] = {}
    for r in rows:
        for m, e in r["by_m"].items():
            best = e["best_us"] or float("nan")
            t = totals.setdefault(m, {"today": 0.0, "widen": 0.0, "cublas": 0.0, "best": 0.0,
                                      "default": 0.0, "fastest": 0.0})  # fmt: skip
            for key in ("today", "widen", "cublas", "default"):
                t[key] += e.get(f"{key}_us") or float("nan")
            t["best"] += best
            t["fastest"] += min(best, e["today_us"])
            tflops = 2 * m * r["n"] * r["k"] / best / 1e6
            print(f"{r['product']:<11}{m:>5}{e['today_us']:>8.1f}{e['widen_us']:>8.1f}"
                  f"{e['cublas_us']:>8.1f}{e['default_us'] or float('nan'):>8.1f}{best:>8.1f}"
                  f"{tflops:>7.0f}{e['today_us'] / best:>8.2f}  {e['best']}")  # fmt: skip
    for m, t in sorted(totals.items()):
        print(f"layer at M={m}: today {t['today']:.0f} us, widen+cuBLAS {t['widen']:.0f}, "
              f"cuBLAS alone {t['cublas']:.0f}, quant_gemm default {t['default']:.0f}, best "
              f"plans {t['best']:.0f}, best of plan and today {t['fastest']:.0f}")  # fmt: skip


def suggested_plans(rows: list[dict[str, object]]) -> list[str]:
    """GEMM_PLANS entries where a plan beat quant_gemm's default by more than 2%."""
    lines = []
    for r in rows:
        for m, e in r["by_m"].items():
            if e["best_us"] and (not e["default_us"] or e["best_us"] < 0.98 * e["default_us"]):
                faster = "" if e["best_us"] < e["today_us"] else "  # slower than today's path"
                lines.append(f'    ({m}, {r["n"]}, {r["k"]}, "{r["formats"]}"): '
                             f'{e["best_plan"]},{faster}')  # fmt: skip
    return lines


def layer_8b() -> int:
    """The --layer-8b mode (see the module's docstring)."""
    started = time.time()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    rows = []
    for name, formats, k in LAYER_8B:
        rows.append(layer_product(name, formats, k, gen, failures))
        print(f"{name} done ({time.time() - started:.0f} s)", flush=True)
        torch.cuda.empty_cache()
    print_layer(rows)
    lines = suggested_plans(rows)
    print("GEMM_PLANS entries (best plan beating the default by > 2%):")
    print("\n".join(lines) or "    (none)")
    return finish("gpu_quant_gemm_layer8b.json", rows, {"suggested_plans": lines}, failures,
                  started)  # fmt: skip


def finish(
    name: str, rows: list, extra: dict[str, object], failures: list[str], started: float
) -> int:
    """Print the failures, write the JSON result `name`; the exit status."""
    print("\n".join(failures) or "all correct")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": rows,
        **extra,
        "failures": failures,
        "seconds": time.time() - started,
    }
    path = output_dir() / name
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} ({time.time() - started:.0f} s)")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no timing")
    parser.add_argument("--quick", action="store_true", help="default tiles only")
    parser.add_argument("--layer-8b", action="store_true", help="an 8B layer's products, plans")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
        return 2
    if args.layer_8b:
        return layer_8b()
    started = time.time()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    rows = []
    for qtype, n, k in SHAPES:
        defaults = tuple(dict.fromkeys(default_tile(m) for m in (SWEEP_M, *OTHER_M)))
        sweep = (
            defaults if args.quick else (*defaults, *(t for t in CANDIDATES if t not in defaults))
        )
        check_shape(qtype, n, k, SWEEP_M, gen, sweep, failures)
        rows.append(time_shape(qtype, n, k, gen, sweep))
        print(f"{qtype.name} [{n}, {k}] done ({time.time() - started:.0f} s)", flush=True)
        torch.cuda.empty_cache()
    print_table(rows)
    ranking = best_tiles(rows)
    for fmt, totals in ranking.items():
        top = ", ".join(f"{name} {us:.0f} us" for name, us in list(totals.items())[:5])
        print(f"{fmt} best tiles over the 8B's shapes at M={SWEEP_M}: {top}")
    return finish("gpu_quant_gemm.json", rows, {"tile_ranking": ranking}, failures, started)


if __name__ == "__main__":
    raise SystemExit(main())
