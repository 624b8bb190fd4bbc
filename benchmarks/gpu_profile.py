"""Where a decode step and a prefill spend their time on the GPU, kernel by kernel.

For each model: the CUDA time of every kernel of one eager decode step and one 512-token prefill
(torch.profiler), grouped by kernel name; the replay time of the captured decode graph; and the
whole step as the engine runs it (host work included). Prints tables and writes JSON to $OUT.

    python benchmarks/gpu_profile.py --synthetic llama3-8b --synthetic gemma3-270m
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T
from torch.profiler import ProfilerActivity, profile

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.scheduler import Chunk
from metallic.engine.sequence import Sequence
from metallic.testing.synthetic import write_synthetic_model


def kernel_table(fn, repeats: int = 3) -> tuple[list[tuple[str, int, float]], float]:
    """(name, launches per call, microseconds per call) of every kernel fn launches, and the
    total kernel microseconds per call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type.name == "CUDA":
            entry = totals[event.name[:60]]
            entry[0] += 1
            entry[1] += event.device_time
    rows = [(name, int(n / repeats), us / repeats) for name, (n, us) in totals.items()]
    rows.sort(key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows)


def event_us(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def wall_us(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e6)
    return statistics.median(times)


def profile_model(label: str, path: Path, ctx: int) -> dict:
    engine = Engine(path, device="cuda", context_size=ctx)
    model, store, runner = engine.model, engine.store, engine.runner
    prompt = list(range(100, 612))
    seq = Sequence(0, 0, prompt, SamplingParams(), engine.tokenizer, len(store.n_blocks), ctx)
    assert engine.blocks.reserve(seq, 0, len(prompt) + 1)
    runner.cuda_graphs = False  # the prefill as it is, not padded for a graph
    prefill, _ = runner.prepare([Chunk(seq, 0, len(prompt))], None)
    runner.cuda_graphs = True
    model.forward(prefill, store)
    seq.token_ids.append(7)
    step = [Chunk(seq, len(prompt), len(prompt) + 1)]
    decode, graphed = runner.prepare(step, None)
    assert graphed
    runner.execute(decode, graphed)  # captures the decode graph
    result: dict[str, object] = {"model": label}
    result["decode_kernels"], result["decode_kernel_us"] = kernel_table(
        lambda: model.forward(decode, store)
    )
    result["decode_graph_us"] = event_us(lambda: runner.execute(decode, True))
    result["decode_eager_wall_us"] = wall_us(lambda: model.forward(decode, store))

    def engine_step() -> None:  # what generation does per token, minus the detokenizer
        batch, _ = runner.prepare(step, None)
        logits = runner.execute(batch, True)
        int(logits.argmax())

    result["decode_step_wall_us"] = wall_us(engine_step)
    result["prefill_kernels"], result["prefill_kernel_us"] = kernel_table(
        lambda: model.forward(prefill, store)
    )
    result["prefill_wall_us"] = wall_us(lambda: model.forward(prefill, store), 5)
    engine.blocks.release(seq)
    return result


def sweep_dequant() -> list[dict]:
    """Time the prefill dequantizer at 8B shapes under each step width, row block and warp
    count (the knobs of quant_matmul's DEQUANT mode)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_quant_matmul import random_blocks

    from metallic.kernels import dequantize_gpu, prepare_weight

    qm = importlib.import_module("metallic.kernels.quant_matmul")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(T.Q4_K, 14336, 4096), (T.Q6_K, 4096, 14336), (T.Q5_0, 2048, 640)]
    weights = [
        (t, n, k, prepare_weight(random_blocks(t, n, k, gen), t, n, k)) for t, n, k in shapes
    ]
    defaults = (qm._DEQUANT_GROUPS, qm._DEQUANT_ROWS, qm._DEQUANT_WARPS)
    rows = []
    for groups in (0, 8, 32):
        for block_rows in (16, 32, 64):
            for warps in (4, 8):
                qm._DEQUANT_GROUPS, qm._DEQUANT_ROWS, qm._DEQUANT_WARPS = groups, block_rows, warps
                for qtype, n, k, packed in weights:
                    us = event_us(
                        lambda p=packed, t=qtype, n=n, k=k: dequantize_gpu(
                            p, t, n, k, torch.bfloat16
                        ),
                        10,
                    )
                    moved = packed.nbytes + 2 * n * k
                    rows.append({"format": qtype.name, "n": n, "k": k, "groups": groups,
                                 "rows": block_rows, "warps": warps, "us": us,
                                 "tb_s": moved / us / 1e6})  # fmt: skip
    qm._DEQUANT_GROUPS, qm._DEQUANT_ROWS, qm._DEQUANT_WARPS = defaults
    print("\ndequantize to bf16 (bytes read + written per us)")
    for r in sorted(rows, key=lambda r: (r["format"], r["us"])):
        print(
            f"  {r['format']:<5} {r['n']:>5}x{r['k']:<5} groups {r['groups']:>2} rows "
            f"{r['rows']:>2} warps {r['warps']} {r['us']:8.1f} us {r['tb_s']:5.2f} TB/s"
        )
    return rows


def sweep_gemv() -> list[dict]:
    """Time the decode GEMV (M = 1) at Gemma 3 270M's small shapes under each group target,
    rows per thread and split-K threshold: these matrices are latency-bound, not bandwidth-bound."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_quant_matmul import graph_us, random_blocks

    from metallic.kernels import prepare_weight, quant_matmul

    qm = importlib.import_module("metallic.kernels.quant_matmul")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(T.Q5_0, 1280, 640), (T.Q8_0, 256, 640), (T.Q4_K, 640, 1024), (T.Q5_0, 4096, 640),
              (T.Q6_K, 640, 2048)]  # fmt: skip
    weights = [
        (t, n, k, prepare_weight(random_blocks(t, n, k, gen), t, n, k)) for t, n, k in shapes
    ]
    defaults = (qm._FMA_GROUPS, qm._FMA_ROWS_PER_THREAD, qm._MIN_SPLIT_BYTES)
    rows = []
    for groups in (8, 16, 32):
        for per_thread in (1, 2):
            for split_bytes in (0, 4 << 20):
                qm._FMA_GROUPS, qm._FMA_ROWS_PER_THREAD, qm._MIN_SPLIT_BYTES = (
                    groups,
                    per_thread,
                    split_bytes,
                )
                total = 0.0
                for qtype, n, k, packed in weights:
                    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                    us = graph_us([lambda p=packed, t=qtype, n=n, k=k, x=x: quant_matmul(
                        x, p, t, n, k)] * 8)  # fmt: skip
                    total += us
                    config = {
                        "groups": groups,
                        "per_thread": per_thread,
                        "split_bytes": split_bytes,
                    }
                    rows.append({"format": qtype.name, "n": n, "k": k, **config, "us": us})
                print(f"  groups {groups:>2} rows/thread {per_thread} split>= {split_bytes:>7}: "
                      f"sum of shapes {total:6.1f} us", flush=True)  # fmt: skip
    qm._FMA_GROUPS, qm._FMA_ROWS_PER_THREAD, qm._MIN_SPLIT_BYTES = defaults
    return rows


def print_profile(r: dict, top: int = 14) -> None:
    print(f"\n== {r['model']}")
    print(
        f"decode: kernels {r['decode_kernel_us']:.0f} us, graph replay {r['decode_graph_us']:.0f}"
        f" us, eager wall {r['decode_eager_wall_us']:.0f} us, engine step wall "
        f"{r['decode_step_wall_us']:.0f} us"
    )
    for name, n, us in r["decode_kernels"][:top]:
        print(f"  {us:8.1f} us {n:4d}x  {name}")
    print(
        f"prefill 512: kernels {r['prefill_kernel_us']:.0f} us, wall {r['prefill_wall_us']:.0f} us"
    )
    for name, n, us in r["prefill_kernels"][:top]:
        print(f"  {us:8.1f} us {n:4d}x  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=[])
    parser.add_argument("--synthetic", action="append", default=[], help="preset, e.g. llama3-8b")
    parser.add_argument("--mix", default="Q4_K_M")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    parser.add_argument("--sweep-dequant", action="store_true", help="tune the prefill dequant")
    parser.add_argument("--sweep-gemv", action="store_true", help="tune small decode GEMVs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA device", file=sys.stderr)
        return 2
    sweep = sweep_dequant() if args.sweep_dequant else []
    gemv = sweep_gemv() if args.sweep_gemv else []
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = [(p.stem, p) for p in args.model]
    for preset in args.synthetic:
        path = args.workdir / f"{preset}-{args.mix}.gguf"
        if not path.exists():
            write_synthetic_model(path, preset, args.mix)
        models.append((preset, path))
    results = []
    for label, path in models:
        results.append(profile_model(label, path, args.ctx))
        print_profile(results[-1])
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    result = {"device": device, "models": results, "dequant_sweep": sweep, "gemv_sweep": gemv}
    (out / "gpu_profile.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
