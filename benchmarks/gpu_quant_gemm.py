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
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
from gguf import GGMLQuantizationType
from gpu_quant_matmul import graph_us, output_dir, random_blocks, relative_error

from metallic.kernels import MAX_FUSED_M, dequantize_gpu, prepare_weight, quant_matmul
from metallic.kernels.quant_gemm import GemmTile, default_tile, quant_gemm

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, no timing")
    parser.add_argument("--quick", action="store_true", help="default tiles only")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
        return 2
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
    print("\n".join(failures) or "all correct")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": rows,
        "tile_ranking": ranking,
        "failures": failures,
        "seconds": time.time() - started,
    }
    path = output_dir() / "gpu_quant_gemm.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
