"""Placement, streaming and residency on the GPU: the 8B under a small device budget.

For the synthetic Llama-3-8B Q4_K_M (written on the GPU machine), runs in one process:

1. All layers on the device (the baseline).
2. `--gpu-memory 2G` (and any other --budget): layers that don't fit are streamed from pinned host
   memory one layer ahead; the bound is the streamed bytes per token over the measured pinned
   host-to-device bandwidth.
3. Residency: a budget that holds every layer but only a minimal KV cache, then a prompt long
   enough that the cache must grow: layers move to the host and back.

Each configuration reports tg128/pp512 tokens/s, peak device memory allocated by torch (which the
budget must bound), layers streamed, residency moves, and whether its greedy tokens equal the
all-on-device run's. Prints a table and writes JSON to $OUT or benchmarks/results/.

    python benchmarks/gpu_placement.py [--budget 2G] [--preset llama3-8b]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from metallic.engine.engine import Engine
from metallic.engine.loader import kv_sizes
from metallic.engine.sampling import SamplingParams
from metallic.runtime.placement import parse_bytes
from metallic.testing.synthetic import write_synthetic_model

PP, TG = 512, 128


def pinned_bandwidth() -> float:
    """Bytes per second of a 256 MiB pinned host-to-device copy."""
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(src.numel(), dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return src.numel() / best


def greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(ids, params)]


def measure(engine: Engine, prompt: list[int], repeats: int = 2) -> dict[str, float]:
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    tg = SamplingParams(temperature=0.0, max_tokens=TG + 1, ignore_eos=True)
    pp_s, tg_s = [], []
    for _ in range(repeats + 1):  # the first round compiles and captures
        list(engine.generate_tokens(prompt, one))
        pp_s.append(engine.last_stats.prefill_seconds)
        list(engine.generate_tokens(prompt[:1], tg))
        tg_s.append(engine.last_stats.decode_seconds)
    return {"pp512": PP / statistics.median(pp_s[1:]), "tg128": TG / statistics.median(tg_s[1:])}


def run(label: str, path: Path, prompt: list[int], reference: list[int] | None, **opts) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    engine = Engine(path, context_size=4096, **opts)
    peak_load = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # from here on: what running costs
    load_s = time.perf_counter() - began
    after_load = torch.cuda.memory_allocated()
    tokens = greedy(engine, prompt[:64], 32)
    row: dict = {"config": label, "load_s": load_s, **measure(engine, prompt)}
    peak_run = torch.cuda.max_memory_allocated()
    stats = engine.stats()
    place = stats["placement"]
    row |= {
        "after_load": after_load,
        "held_after_runs": torch.cuda.memory_allocated(),  # weights, KV and the graphs' pools
        "weight_bytes": stats["weight_bytes"],
        "kv_bytes": stats["kv_cache_bytes"],
        "reserve_bytes": engine.plan.reserve_bytes if engine.plan else None,
        "peak_load": peak_load,
        "peak_run": peak_run,
        "peak_allocated": max(peak_run, peak_load),
        "layers_streamed": place["layers_streamed"],  # type: ignore[index]
        "streamed_per_token": (
            engine.model.streamer.host_bytes if engine.model.streamer is not None else 0
        ),
        "greedy_equal": reference is None or tokens == reference,
        "pool_peak": engine.memory.peak_reserved_bytes if engine.memory else 0,
        "tokens": tokens,
    }
    if opts.get("memory_budget"):
        row["budget"] = parse_bytes(str(opts["memory_budget"]))
    del engine
    return row


def residency(path: Path, long_prompt: list[int]) -> dict:
    """All layers fit but only a minimal KV cache: a long prompt forces moves."""
    probe = Engine(path, context_size=4096, memory_budget=1 << 40)
    assert probe.plan is not None
    layout = probe.store.layout
    least = layout.bytes(kv_sizes(layout, 4096, 512).least(layout, 512))
    budget = probe.plan.weight_bytes + probe.plan.reserve_bytes + least
    reference = greedy(probe, long_prompt, 16)
    del probe
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(path, context_size=4096, memory_budget=budget)
    began = time.perf_counter()
    tokens = greedy(engine, long_prompt, 16)
    seconds = time.perf_counter() - began
    place = engine.stats()["placement"]
    return {
        "budget": budget,
        "prompt_tokens": len(long_prompt),
        "seconds": seconds,
        "evictions": place["evictions"],  # type: ignore[index]
        "restores": place["restores"],  # type: ignore[index]
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "pool_peak": engine.memory.peak_reserved_bytes if engine.memory else 0,
        "pool_allowance": budget - engine.plan.reserve_bytes if engine.plan else 0,
        "greedy_equal": tokens == reference,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--mix", default="Q4_K_M")
    parser.add_argument("--budget", action="append", default=[], help="e.g. 2G (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_placement: needs a CUDA device", file=sys.stderr)
        return 2
    budgets = args.budget or ["2G"]
    device = torch.cuda.get_device_name()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"{args.preset}-{args.mix}.gguf"
    if not path.exists():
        write_synthetic_model(path, args.preset, args.mix)
    h2d = pinned_bandwidth()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 100_000, (PP,), generator=gen).tolist()
    long_prompt = torch.randint(100, 100_000, (1500,), generator=gen).tolist()
    rows = [run("all on device", path, prompt, None)]
    reference = rows[0]["tokens"]
    for budget in budgets:
        rows.append(run(f"--gpu-memory {budget}", path, prompt, reference, memory_budget=budget))
    moves = residency(path, long_prompt)
    print(f"\n{device}, {args.preset} {args.mix}; pinned host->device {h2d / 1e9:.1f} GB/s")
    print(
        f"{'config':<22}{'tg128':>8}{'pp512':>9}{'peak MiB':>10}{'streamed':>9}"
        f"{'PCIe floor':>11}{'greedy=':>8}{'load s':>8}"
    )
    for r in rows:
        floor = h2d / r["streamed_per_token"] if r["streamed_per_token"] else float("nan")
        r["pcie_floor_tok_s"] = floor
        print(
            f"{r['config']:<22}{r['tg128']:>8.1f}{r['pp512']:>9.0f}"
            f"{r['peak_allocated'] / 2**20:>10.0f}{r['layers_streamed']:>9}{floor:>11.1f}"
            f"{r['greedy_equal']!s:>8}{r['load_s']:>8.1f}"
        )
    for r in rows:
        print(
            f"{r['config']}: after load {r['after_load'] / 2**20:.0f} MiB (weights "
            f"{r['weight_bytes'] / 2**20:.0f}, KV {r['kv_bytes'] / 2**20:.0f}), peak at load "
            f"{r['peak_load'] / 2**20:.0f}, peak running {r['peak_run'] / 2**20:.0f}, "
            f"held after runs {r['held_after_runs'] / 2**20:.0f} MiB, memory pool peak "
            f"{r['pool_peak'] / 2**20:.0f} MiB, plan reserve "
            f"{(r['reserve_bytes'] or 0) / 2**20:.0f} MiB"
        )
    print(
        f"residency: budget {moves['budget'] / 2**20:.0f} MiB, {moves['prompt_tokens']}-token "
        f"prompt: {moves['evictions']} layers out, {moves['restores']} back, peak "
        f"{moves['peak_allocated'] / 2**20:.0f} MiB (memory pool {moves['pool_peak'] / 2**20:.0f} "
        f"of the plan's {moves['pool_allowance'] / 2**20:.0f}), "
        f"greedy equal {moves['greedy_equal']}, "
        f"{moves['seconds']:.1f} s"
    )
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "h2d_bandwidth": h2d, "rows": rows, "residency": moves}
    (out / "gpu_placement.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
