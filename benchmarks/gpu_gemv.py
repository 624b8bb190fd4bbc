"""The dp4a decode kernels (metallic.kernels.quant_gemv) at Llama-3-8B shapes: correctness first,
then the earlier "tile" kernels against the "owner" kernels and a sweep of the owners' geometry.

Correctness: every kernel and geometry against x W^T in float64, with W dequantized on the GPU
(itself checked bit-exact against metallic.quant.reference on 2 x 64 rows) and x as rounded to
int8 (what the kernels multiply; the rounding of x itself is reported too). Timing: calls
replayed back to back from one CUDA graph over enough weight copies to defeat the L2
(gpu_quant_matmul.py's method); the product alone (x rounded once outside), as a share of a
device-to-device copy's bandwidth measured in the same run. Beside it: the float decode kernel
(quant_matmul, M = 1), the default dp4a path with x's rounding included, and a plain streaming
read of the same bytes. Small shapes (Gemma 3 270M's FFN) show where the float kernel should
stay (quant_gemv.DP4A_MIN_BYTES).

Rows of x (--rows 1,2,4,8, also part of --quick): a decode step of M sequences at the 8B's
shapes, the dp4a kernels at M rows (with and without x's rounding launch) against the path those
rows took before them (quant_matmul's float kernel, ops.linear's "fused"), after checking each
against float64 and that every row's result is the same bits alone as among the M.

GPU:   python benchmarks/gpu_gemv.py           (JSON to $OUT or benchmarks/results)
       python benchmarks/gpu_gemv.py --quick   (large shapes, few geometries, then --rows)
       python benchmarks/gpu_gemv.py --rows 1,2,4,8   (rows of x only; under 2 minutes)
CPU:   TRITON_INTERPRET=1 python benchmarks/gpu_gemv.py --smoke   (correctness, small shapes,
       rows of x too)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType
from gpu_quant_matmul import (
    ROTATION_BYTES,
    check_reference_rows,
    copy_bandwidth,
    graph_us,
    random_blocks,
    relative_error,
)

from metallic.kernels import dequantize_gpu, prepare_weight, quant_matmul
from metallic.kernels.packing import PackedWeight
from metallic.kernels.quant_gemv import (
    DP4A_MAX_ROWS,
    Geometry,
    default_geometry,
    gemv,
    gemv_parts,
    normalized,
    quantize_x,
)
from metallic.quant.reference import dequantize

T = GGMLQuantizationType
SHAPES = (
    (T.Q4_K, 4096, 4096),  # q, o
    (T.Q4_K, 1024, 4096),  # k
    (T.Q4_K, 14336, 4096),  # gate, up
    (T.Q4_K, 4096, 14336),  # down, half the layers
    (T.Q6_K, 1024, 4096),  # v
    (T.Q6_K, 4096, 14336),  # down, the other half
    (T.Q6_K, 128256, 4096),  # output head
    (T.Q4_K, 640, 2048),  # Gemma 3 270M's down: where the float kernel may stay faster
    (T.Q6_K, 640, 2048),
)
SMOKE_SHAPES = ((T.Q4_K, 40, 1024), (T.Q6_K, 40, 1024), (T.Q4_K, 9, 768), (T.Q6_K, 9, 768))
ROWS, SBS, WARPS, SPLITS = (8, 16, 32), (8, 16), (4, 8), (1, 2, 4, 7)
# --quick (under 2 minutes): the 8B's large shapes and a few geometries, no float kernel.
QUICK_SHAPES = tuple(s for s in SHAPES if s[1] * s[2] >= 4096 * 4096)
QUICK_TILES = ((32, 8, 4),)  # rows, super-blocks a step, warps
TOLERANCE = 1e-2  # bf16 output against the float64 product with x as rounded
# --rows: Llama-3-8B's products of a decode step (name, format, N, K, parts: gate|up is a pair).
ROW_SHAPES = (
    ("q", T.Q4_K, 4096, 4096, 1),
    ("k", T.Q4_K, 1024, 4096, 1),
    ("v", T.Q6_K, 1024, 4096, 1),
    ("gate|up", T.Q4_K, 14336, 4096, 2),
    ("down", T.Q4_K, 4096, 14336, 1),
    ("down", T.Q6_K, 4096, 14336, 1),
    ("output", T.Q6_K, 128256, 4096, 1),
)
SMOKE_ROW_SHAPES = (("q", T.Q4_K, 24, 512, 1), ("gate|up", T.Q4_K, 16, 512, 2),
                    ("v", T.Q6_K, 13, 512, 1))  # fmt: skip


def old_geometry(n: int, k: int, qtype: GGMLQuantizationType, sms: int) -> Geometry:
    """The tile kernels' defaults before the owner kernels (measured on an H100)."""
    wide, tall = k > 16 * 256, n >= 32768
    rows = (32 if qtype == T.Q4_K else 16) if wide else 16 if tall else 8
    splits = 2 if wide and qtype == T.Q4_K else 1
    while rows > 4 and triton.cdiv(n, rows) * splits < sms:
        rows //= 2
    return Geometry(rows, 8 if wide or tall else 16, splits, 8 if wide or tall else 4, "tile")


def sweep_geometries(
    qtype: GGMLQuantizationType, n: int, k: int, quick: bool = False
) -> list[Geometry]:
    """The owner kernels' distinct candidates for an [n, k] matrix (a step is cut down to what
    divides a split, as gemv does), and for Q4_K the staged ones that do not spill."""
    n_sb = k // 256
    out: list[Geometry] = []
    tiles = QUICK_TILES if quick else itertools.product(ROWS, SBS, WARPS)
    for (rows, sbs, warps), splits in itertools.product(tiles, (1,) if quick else SPLITS):
        if n_sb % splits:
            continue
        g = normalized(Geometry(rows, sbs, splits, warps), k)
        if g.rows * g.sbs >= 32 * warps and g not in out:  # no idle threads
            out.append(g)
    if qtype == T.Q4_K and not quick:
        out += [
            dataclasses.replace(g, kernel="staged") for g in out if g.rows * g.sbs <= 64 * g.warps
        ]
    return out


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


def check_all(
    label: str, xq: tuple, packed, exact: torch.Tensor, geometries: list[Geometry],
    failures: list[str],
) -> list[Geometry]:  # fmt: skip
    """The geometries whose product matches `exact` (the others are recorded as failures)."""
    good = []
    out = torch.empty(1, packed.n, dtype=torch.bfloat16, device=exact.device)
    for g in geometries:
        out.fill_(float("nan"))
        try:
            gemv(xq, packed, out, g)
        except Exception as error:  # a variant that does not compile: report it, go on
            failures.append(f"{label} {g}: {str(error).splitlines()[-1][:200]}")
            continue
        err = relative_error(out, exact)
        if err <= TOLERANCE:
            good.append(g)
        else:
            failures.append(f"{label} {g}: relative error {err:.3g} vs rounded x")
    return good


def smoke() -> int:
    """Every kernel and a few geometries at small shapes on the CPU (under TRITON_INTERPRET=1),
    against the reference dequantizer in float64."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    for qtype, n, k in SMOKE_SHAPES:
        raw = random_blocks(qtype, n, k, gen)
        dense = dequantize(raw, qtype, n * k).view(n, k).double()
        x = torch.randn(k, generator=gen).to(torch.bfloat16)
        xq = quantize_x(x)
        exact = (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(1, k) @ dense.T
        geometries = [old_geometry(n, k, qtype, 2), default_geometry(qtype, n, k)]
        geometries += [Geometry(8, 2, 2, 1), Geometry(16, 1, 3, 2), Geometry(8, 2, 2, 1, "staged")]
        geometries += [Geometry(8, 2, 2, 1, hoist=False)]
        label = f"{qtype.name} [{n}, {k}]"
        good = check_all(label, xq, prepare_weight(raw, qtype, n, k), exact, geometries, failures)
        print(f"{label}: {len(good)}/{len(geometries)} geometries match", flush=True)
    for failure in failures:
        print("FAIL", failure)
    print(f"seed {gen.initial_seed()}")
    return 1 if failures else 0


def bench_shape(
    qtype: GGMLQuantizationType, n: int, k: int, gen: torch.Generator, copy_bw: float,
    sms: int, failures: list[str], quick: bool = False,
) -> dict[str, object]:  # fmt: skip
    raw = random_blocks(qtype, n, k, gen)
    count = min(16, -(-ROTATION_BYTES // raw.numel()))
    raws = [raw] + [random_blocks(qtype, n, k, gen) for _ in range(count - 1)]
    copies = [prepare_weight(r, qtype, n, k) for r in raws]
    dense = dequantize_gpu(copies[0], qtype, n, k)
    check_reference_rows(qtype, raw, dense, k, failures)
    dense = dense.double()
    x = torch.randn(1, k, device=gen.device, generator=gen, dtype=torch.bfloat16)
    xq = quantize_x(x[0])
    exact = (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(1, k) @ dense.T
    ref = x.double() @ dense.T
    del dense
    label = f"{qtype.name} [{n}, {k}]"
    old, new = old_geometry(n, k, qtype, sms), normalized(default_geometry(qtype, n, k), k)
    candidates = [old, new]
    if not quick or qtype == T.Q6_K or k > 4096:  # --quick: the barrier measured both ways
        candidates.append(dataclasses.replace(new, hoist=False))
    if qtype == T.Q4_K:
        candidates.append(dataclasses.replace(new, kernel="staged"))
    candidates += [g for g in sweep_geometries(qtype, n, k, quick) if g != new]
    good = check_all(label, xq, copies[0], exact, candidates, failures)
    out = torch.empty(1, n, device=gen.device, dtype=torch.bfloat16)
    gemv(xq, copies[0], out)
    row: dict[str, object] = {
        "format": qtype.name, "n": n, "k": k, "weight_bytes": raw.numel(),
        "err_vs_x": relative_error(out, ref), "old": str(old), "default": str(new),
    }  # fmt: skip

    def product_us(g: Geometry) -> float | None:
        try:
            return graph_us([lambda w=w: gemv(xq, w, out, g) for w in copies])
        except Exception as error:  # report it, time the others
            failures.append(f"{label} {g}: timing: {error!r}"[:300])
            return None

    timed = []
    for g in good:
        if g != old and (us := product_us(g)) is not None:
            timed.append((us, g))
    timed.sort(key=lambda t: t[0])
    row["old_us"] = product_us(old) if old in good else None  # (old is not in timed)
    row["default_us"] = next((us for us, g in timed if g == new), None)
    row["best_us"], best = timed[0] if timed else (None, None)
    row["best"] = str(best)
    row["best_geometry"] = dataclasses.asdict(best) if best else None
    row["top5"] = [(round(us, 2), str(g)) for us, g in timed[:5]]
    row["read_us"] = read_us(raws)
    row["float_us"] = None
    if not quick:
        row["float_us"] = graph_us([lambda w=w: quant_matmul(x, w, qtype, n, k) for w in copies])
    row["dp4a_with_rounding_us"] = graph_us(
        [lambda w=w: gemv(quantize_x(x[0]), w, out) for w in copies]
    )
    for key in ("old", "default", "best", "read", "float", "dp4a_with_rounding"):
        us = row[f"{key}_us"]
        row[f"{key}_copy_pct"] = 100 * raw.numel() / (us * 1e-6) / copy_bw if us else None
    return row


def bench_gate_up(
    gen: torch.Generator, copy_bw: float, failures: list[str], n: int = 14336, k: int = 4096
) -> dict[str, object]:
    """Llama-3-8B's gate and up (two Q4_K [14336, 4096] parts): one launch against two."""
    raws = [random_blocks(T.Q4_K, n, k, gen) for _ in range(8)]  # 4 pairs, 264 MB
    pairs = [
        (prepare_weight(a, T.Q4_K, n, k), prepare_weight(b, T.Q4_K, n, k))
        for a, b in zip(raws[::2], raws[1::2], strict=True)
    ]
    x = torch.randn(k, device=gen.device, generator=gen, dtype=torch.bfloat16)
    xq = quantize_x(x)
    out = torch.empty(1, 2 * n, device=gen.device, dtype=torch.bfloat16)
    gemv_parts(xq, pairs[0], out)
    dense = torch.cat([dequantize_gpu(p, T.Q4_K, n, k) for p in pairs[0]]).double()
    exact = (xq[0].view(-1, 32).double() * xq[1][:, None].double()).view(1, k) @ dense.T
    err = relative_error(out, exact)
    if not err <= TOLERANCE:
        failures.append(f"gate|up in one launch: relative error {err:.3g} vs rounded x")

    def apart(pair: tuple) -> None:
        gemv(xq, pair[0], out[:, :n])
        gemv(xq, pair[1], out[:, n:])

    one = graph_us([lambda p=p: gemv_parts(xq, p, out) for p in pairs])
    two = graph_us([lambda p=p: apart(p) for p in pairs])
    pct = {key: 100 * 2 * raws[0].numel() / (us * 1e-6) / copy_bw for key, us in
           (("one", one), ("two", two))}  # fmt: skip
    return {"one_launch_us": one, "two_launches_us": two, "one_pct": pct["one"],
            "two_pct": pct["two"], "err": err}  # fmt: skip


def _rows_product(xq: tuple, parts: tuple[PackedWeight, ...], out: torch.Tensor) -> None:
    """The dp4a path of ops.linear: every part against x rounded once."""
    gemv_parts(xq, parts, out)


def _fused_product(x: torch.Tensor, parts: tuple[PackedWeight, ...], out: torch.Tensor) -> None:
    """The path M = 2..8 rows took before the dp4a kernels did: quant_matmul a part at a time,
    each writing its own columns (ops.linear's "fused")."""
    first = 0
    for p in parts:
        quant_matmul(x, p, p.ggml_type, p.n, p.k, out=out[:, first : first + p.n])
        first += p.n


def check_rows(
    label: str, x: torch.Tensor, parts: tuple[PackedWeight, ...], dense: torch.Tensor,
    failures: list[str],
) -> dict[str, float]:  # fmt: skip
    """Both paths at M = x's rows against float64 (the dp4a one with x as rounded, the float
    one with x), and each row of the dp4a product the same bits as that row alone."""
    m, n = x.shape[0], dense.shape[0]
    xq = quantize_x(x)
    exact = (xq[0].reshape(-1, 32).double() * xq[1].reshape(-1, 1).double()).view(m, -1) @ dense.T
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    _rows_product(xq, parts, out)
    errors = {"dp4a_err": relative_error(out, exact)}
    fused = torch.full_like(out, float("nan"))
    _fused_product(x, parts, fused)
    errors["fused_err"] = relative_error(fused, x.double() @ dense.T)
    for key, err in errors.items():
        if not err <= TOLERANCE:
            failures.append(f"{label} M={m}: {key} {err:.3g}")
    alone = torch.empty(1, n, dtype=x.dtype, device=x.device)
    for r in range(m):
        _rows_product(quantize_x(x[r]), parts, alone)
        if not torch.equal(alone[0], out[r]):
            failures.append(f"{label} M={m}: row {r} differs from the row alone")
    return errors


def bench_rows(
    name: str, qtype: GGMLQuantizationType, n: int, k: int, n_parts: int, row_counts: list[int],
    gen: torch.Generator, copy_bw: float, failures: list[str], smoke: bool = False,
) -> list[dict[str, object]]:  # fmt: skip
    """One product of a decode step at each M: checks, then (on the GPU) µs per product."""
    raws = [random_blocks(qtype, n, k, gen) for _ in range(n_parts)]
    if smoke:
        dense = torch.cat([dequantize(r, qtype, n * k).view(n, k) for r in raws]).double()
        copies = [tuple(prepare_weight(r, qtype, n, k) for r in raws)]
    else:
        count = min(16, -(-ROTATION_BYTES // (n_parts * raws[0].numel())))
        copies = [tuple(prepare_weight(r, qtype, n, k) for r in raws)]
        copies += [tuple(prepare_weight(random_blocks(qtype, n, k, gen), qtype, n, k)
                         for _ in range(n_parts)) for _ in range(count - 1)]  # fmt: skip
        dense = torch.cat([dequantize_gpu(p, qtype, n, k) for p in copies[0]])
        check_reference_rows(qtype, raws[0], dense[:n], k, failures)
        dense = dense.double()
    label = f"{name} {qtype.name} {n_parts}x[{n}, {k}]"
    weight_bytes = n_parts * raws[0].numel()
    # bf16 as the 8B runs; f16 in the interpreter, whose tl.dot on bf16 (the float kernel's
    # from 2 rows) is wrong (tests/kernels/test_quant_matmul.py)
    dtype = torch.float16 if smoke else torch.bfloat16
    x_all = torch.randn(max(row_counts), k, device=gen.device, generator=gen, dtype=dtype)
    results = []
    for m in row_counts:
        x = x_all[:m]
        row: dict[str, object] = {"name": name, "format": qtype.name, "n": n_parts * n, "k": k,
                                  "m": m, "weight_bytes": weight_bytes}  # fmt: skip
        row |= check_rows(label, x, copies[0], dense, failures)
        if not smoke:
            out = torch.empty(m, n_parts * n, dtype=x.dtype, device=x.device)
            xq = quantize_x(x)
            row["dp4a_us"] = graph_us(
                [lambda w=w, xq=xq, out=out: _rows_product(xq, w, out) for w in copies]
            )
            row["dp4a_round_us"] = graph_us(
                [lambda w=w, x=x, out=out: _rows_product(quantize_x(x), w, out) for w in copies]
            )
            row["fused_us"] = graph_us(
                [lambda w=w, x=x, out=out: _fused_product(x, w, out) for w in copies]
            )
            for key in ("dp4a", "dp4a_round", "fused"):
                row[f"{key}_copy_pct"] = 100 * weight_bytes / (row[f"{key}_us"] * 1e-6) / copy_bw
        results.append(row)
        print(json.dumps(row), flush=True)
    del dense
    return results


def print_rows_table(results: list[dict[str, object]]) -> None:
    """µs per product at each M (% of copy bandwidth), and a step's sum over the 8B's products:
    32 layers of q, k, v, o (as q), gate|up and down (half Q4_K, half Q6_K), and the output."""
    print("\n| product | format | N x K | M | dp4a | dp4a + rounding | fused (before) | gain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['name']} | {r['format']} | {r['n']}x{r['k']} | {r['m']} | "
            f"{r['dp4a_us']:.1f} ({r['dp4a_copy_pct']:.0f}%) | "
            f"{r['dp4a_round_us']:.1f} ({r['dp4a_round_copy_pct']:.0f}%) | "
            f"{r['fused_us']:.1f} ({r['fused_copy_pct']:.0f}%) | "
            f"{r['fused_us'] / r['dp4a_round_us']:.2f}x |"
        )
    weights = {"q": 64, "k": 32, "v": 32, "gate|up": 32, "down": 16, "output": 1}
    for m in sorted({r["m"] for r in results}):
        rows = [r for r in results if r["m"] == m]
        if {r["name"] for r in rows} != set(weights):
            continue
        dp4a = sum(weights[r["name"]] * r["dp4a_round_us"] for r in rows) / 1e3
        fused = sum(weights[r["name"]] * r["fused_us"] for r in rows) / 1e3
        print(f"M={m}: the 8B's products per step {dp4a:.2f} ms with dp4a, {fused:.2f} ms fused")


def rows_mode(row_counts: list[int], copy_bw: float, failures: list[str],
              smoke: bool = False) -> list[dict[str, object]]:  # fmt: skip
    """--rows (and --smoke's rows of x): every shape of ROW_SHAPES at each M."""
    device = "cpu" if smoke else "cuda"
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(4), "little"))
    results: list[dict[str, object]] = []
    for name, qtype, n, k, n_parts in SMOKE_ROW_SHAPES if smoke else ROW_SHAPES:
        try:
            results += bench_rows(name, qtype, n, k, n_parts, row_counts, gen, copy_bw,
                                  failures, smoke)  # fmt: skip
        except Exception as error:  # one shape's failure must not lose the others
            failures.append(f"rows {name} {qtype.name}: {error!r}"[:300])
    if not smoke:
        print_rows_table(results)
    print(f"rows: seed {gen.initial_seed()}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes on the CPU only")
    parser.add_argument("--only", default="", help="shapes whose 'TYPE NxK' contains this")
    parser.add_argument("--quick", action="store_true", help="large shapes, few geometries")
    parser.add_argument("--rows", help="rows of x only, e.g. 1,2,4,8 (--quick: those four)")
    args = parser.parse_args()
    try:
        row_counts = [int(m) for m in (args.rows or "1,2,4,8").split(",")]
    except ValueError:
        parser.error(f"--rows: comma-separated integers, got {args.rows!r}")
    if not all(1 <= m <= DP4A_MAX_ROWS for m in row_counts):
        parser.error(f"--rows: each from 1 to {DP4A_MAX_ROWS}, got {args.rows!r}")
    if args.smoke:
        failures: list[str] = []
        rows_mode([1, 3], 0.0, failures, smoke=True)
        for failure in failures:
            print("FAIL", failure)
        return smoke() or (1 if failures else 0)
    start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    print(f"{device}: copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    failures = []
    results, gate_up, row_results = [], None, []
    if args.rows is None:
        results, gate_up = shapes_mode(args, gen, copy_bw, sms, failures, start)
    if args.rows is not None or args.quick:
        row_results = rows_mode(row_counts, copy_bw, failures)
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "copy_bw": copy_bw, "results": results, "gate_up": gate_up,
              "rows": row_results, "failures": failures}  # fmt: skip
    (out_dir / "gpu_gemv.json").write_text(json.dumps(result, indent=1))
    for failure in failures:
        print("FAIL", failure)
    print(f"{time.time() - start:.0f} s")
    return 1 if failures else 0


def shapes_mode(
    args: argparse.Namespace, gen: torch.Generator, copy_bw: float, sms: int,
    failures: list[str], start: float,
) -> tuple[list[dict[str, object]], dict[str, object] | None]:  # fmt: skip
    """One row of x: each shape's kernels and geometries, then gate|up in one launch or two."""
    results = []
    for qtype, n, k in QUICK_SHAPES if args.quick else SHAPES:
        if args.only not in f"{qtype.name} {n}x{k}":
            continue
        try:
            results.append(bench_shape(qtype, n, k, gen, copy_bw, sms, failures, args.quick))
        except Exception as error:  # one shape's failure must not lose the others
            failures.append(f"{qtype.name} [{n}, {k}]: {error!r}"[:300])
            continue
        print(json.dumps(results[-1]), f"({time.time() - start:.0f} s)", flush=True)
    gate_up = None
    if not args.only:
        try:
            gate_up = bench_gate_up(gen, copy_bw, failures)
        except Exception as error:
            failures.append(f"gate|up: {error!r}"[:300])
    device = torch.cuda.get_device_name()
    print(f"\n{device}, copy {copy_bw / 1e12:.2f} TB/s; µs per product (% of copy bandwidth)")
    print("| format | N x K | MB | read | float | tile (old) | owner default | best | +round |")
    print("|---|---|---|---|---|---|---|---|---|")

    def cell(r: dict, key: str) -> str:
        us = r[f"{key}_us"]
        return f"{us:.1f} ({r[f'{key}_copy_pct']:.0f}%)" if us else "-"

    for r in results:
        print(
            f"| {r['format']} | {r['n']}x{r['k']} | {r['weight_bytes'] / 1e6:.1f} | "
            + " | ".join(
                cell(r, key)
                for key in ("read", "float", "old", "default", "best", "dp4a_with_rounding")
            )
            + " |"
        )
    for r in results:
        print(f"{r['format']} {r['n']}x{r['k']}: best {r['best']}")
    if gate_up:
        print(
            f"gate|up 2 x 14336x4096 Q4_K: one launch {gate_up['one_launch_us']:.1f} µs "
            f"({gate_up['one_pct']:.0f}%), two {gate_up['two_launches_us']:.1f} µs "
            f"({gate_up['two_pct']:.0f}%)"
        )
    return results, gate_up


if __name__ == "__main__":
    sys.exit(main())
