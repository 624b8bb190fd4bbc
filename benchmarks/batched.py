"""Many sequences at once: aggregate decode speed beside llama.cpp, and the prefix cache.

1. batch-B, llama-batched-bench's S_TG: B requests of 128 random prompt tokens, 128 tokens
   generated each (greedy, EOS ignored), submitted together. llama-batched-bench prefills
   every prompt, then times decode steps of all B sequences; here prompts are admitted a
   chunk budget at a time while the first ones already decode, so the same quantity is taken
   over the steps where all B decode: from the moment the last sequence has its first token to
   the moment the first one ends. S_TG = the tokens generated in that window / its seconds.
   A round of the same B runs first as warm-up (kernel compiles, graph captures, KV growth).
2. Prefix cache (--prefix): 64 requests sharing a 1,000-token system prompt, each with 24 tokens
   of its own and 16 generated, submitted together: time to first token (p50, p99) and the
   whole burst's seconds, with the prefix cache on and off.
3. Baselines in the same run (--llama-bin DIR): llama-batched-bench on the same file (S_TG at
   the same B, prompts and outputs) and llama-bench (pp512, tg128).
4. On the CPU (--device cpu): 8 prompts through `generate_batch` against the same 8 one after
   another, generated tokens per second.
5. Check first (--check): 16 prompts' greedy tokens run together against each run alone; a
   difference must start at a near-tie of the alone run (its top two logits' gap is printed).

Prints a table, writes the results and a record (benchmarks/common.py) to $OUT or
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    copy_bandwidth,
    device_name,
    llama_batched_bench,
    llama_bench,
    out_dir,
    row,
    synthetic_model,
    write_record,
)

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams

PROMPT, GENERATED = 128, 128


def random_prompts(engine: Engine, n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    return [torch.randint(100, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def burst(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """Submit every prompt at once and run to the end; per-request first-token times and
    the decode phase as llama-batched-bench defines it."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    began = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[object, float] = {}
    stamps: list[float] = []  # when each generated token reached the host
    first_end = 0.0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.token_ids:
                first.setdefault(out.request_id, now)
                stamps.append(now)
            if out.finished and not first_end:
                first_end = now
    end = time.perf_counter()
    assert len(first) == len(ids) and len(stamps) == len(ids) * max_tokens
    all_decoding = max(first.values())
    decoded = sum(1 for t in stamps if all_decoding < t <= first_end)
    ttft = sorted(t - began for t in first.values())
    return {
        "s_tg": decoded / (first_end - all_decoding) if decoded else 0.0,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "seconds": end - began,
        "tokens_per_s": len(stamps) / (end - began),
    }


def batch_sizes(engine: Engine, sizes: list[int]) -> dict[int, dict[str, object]]:
    results: dict[int, dict[str, object]] = {}
    for b in sizes:
        prompts = random_prompts(engine, b, PROMPT, seed=b)
        burst(engine, prompts, GENERATED)  # warm-up
        before = dict(vars(engine.step_times))
        results[b] = burst(engine, random_prompts(engine, b, PROMPT, seed=1000 + b), GENERATED)
        after = vars(engine.step_times)
        steps = after["steps"] - before["steps"]
        results[b]["host_ms_per_step"] = {
            phase: 1e3 * (after[phase] - before[phase]) / steps
            for phase in ("schedule", "launch", "wait", "collect")
        }
        print(
            f"  B={b}: S_TG {results[b]['s_tg']:.0f} tok/s, per step (ms) "
            f"{results[b]['host_ms_per_step']}",
            flush=True,
        )
    return results


def host_profile(engine: Engine, b: int, steps: int = 20) -> None:
    """Where the host's time goes in steady decode steps of `b` sequences (cProfile)."""
    import cProfile
    import pstats

    params = SamplingParams(temperature=0.0, max_tokens=steps + 40, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in random_prompts(engine, b, 64, seed=6)]
    started: set[object] = set()
    while len(started) < len(ids):
        started |= {out.request_id for out in engine.step() if out.token_ids}
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
    for request in ids:
        engine.abort(request)
    while engine.has_unfinished():
        engine.step()


def decode_kernels(engine: Engine, b: int, steps: int = 10) -> dict[str, object]:
    """Device time per kernel over steady decode steps of `b` sequences."""
    from gpu_profile import kernel_table

    params = SamplingParams(temperature=0.0, max_tokens=steps * 3 + 20, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in random_prompts(engine, b, 64, seed=4)]
    started: set[object] = set()
    while len(started) < len(ids):
        started |= {out.request_id for out in engine.step() if out.token_ids}
    began = time.perf_counter()
    rows, kernel_us = kernel_table(engine.step, repeats=steps)
    wall = (time.perf_counter() - began) / (steps + 1)
    for request in ids:
        engine.abort(request)
    while engine.has_unfinished():
        engine.step()
    top = [(name, n, round(us, 1)) for name, n, us in rows[:14]]
    print(f"  B={b} decode step: kernels {kernel_us:.0f} us, wall {wall * 1e6:.0f} us", flush=True)
    for name, n, us in top:
        print(f"    {us:>8.1f} us  x{n:<4} {name}", flush=True)
    return {"kernel_us": kernel_us, "wall_us": wall * 1e6, "top": top}


def prefix_workload(path: Path, device: str, ctx: int) -> dict[str, dict[str, float]]:
    results = {}
    for cached in (True, False):
        engine = Engine(path, device=device, context_size=ctx, prefix_cache=cached)
        system = random_prompts(engine, 1, 1000, seed=7)[0]
        own = random_prompts(engine, 64, 24, seed=8)
        warm = random_prompts(engine, 64, 24, seed=9)
        burst(engine, [system[:100] + p for p in warm], 16)  # compiles and captures
        result = burst(engine, [system + p for p in own], 16)
        result["hit_tokens"] = engine.stats()["prefix_cache"]["hit_tokens"]
        results["on" if cached else "off"] = result
        print(f"  prefix cache {'on' if cached else 'off'}: {result}", flush=True)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def cpu_comparison(engine: Engine, n: int = 8, generated: int = 32) -> dict[str, float]:
    prompts = random_prompts(engine, n, 32, seed=3)
    kwargs = {"max_tokens": generated, "temperature": 0, "ignore_eos": True}
    engine.generate_batch(prompts[:2], **{**kwargs, "max_tokens": 2})  # warm-up
    began = time.perf_counter()
    one_by_one = [engine.generate_batch_tokens([p], **kwargs)[0] for p in prompts]
    alone = time.perf_counter() - began
    began = time.perf_counter()
    together = engine.generate_batch_tokens(prompts, **kwargs)
    batched = time.perf_counter() - began
    return {
        "one_by_one_tok_s": n * generated / alone,
        "batched_tok_s": n * generated / batched,
        "same_tokens": sum(a == b for a, b in zip(one_by_one, together, strict=True)),
    }


def check(engine: Engine, n: int = 16, generated: int = 32) -> dict[str, object]:
    prompts = random_prompts(engine, n, 48, seed=5)
    kwargs = {"max_tokens": generated, "temperature": 0, "ignore_eos": True}
    together = engine.generate_batch_tokens(prompts, **kwargs)
    gaps = []
    for prompt, got in zip(prompts, together, strict=True):
        alone = engine.generate_batch_tokens([prompt], **kwargs)[0]
        if got != alone:
            k = next(i for i, (a, b) in enumerate(zip(got, alone, strict=True)) if a != b)
            top2 = engine.logits(prompt + alone[:k])[-1].topk(2).values
            gaps.append((k, float(top2[0] - top2[1])))
    return {"identical": n - len(gaps), "of": n, "first_difference_and_top2_gap": gaps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the real Gemma 3 270M GGUF")
    parser.add_argument("--synthetic", action="append", default=[], help="preset: llama3-8b")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--prefix", action="store_true", help="the shared-prefix workload")
    parser.add_argument("--check", action="store_true", help="batched vs alone greedy tokens")
    parser.add_argument("--kernels", type=int, default=0, help="profile decode at this B")
    parser.add_argument("--host-profile", type=int, default=0, help="cProfile decode at this B")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp's build/bin for baselines")
    parser.add_argument("--vocab", type=Path, help="vocab GGUF for synthetic files (llama.cpp)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    args = parser.parse_args()
    device = torch.device(args.device)
    name = device_name(device)
    models = [("gemma", args.model)] if args.model else []
    args.workdir.mkdir(parents=True, exist_ok=True)
    for preset in args.synthetic:
        models.append((preset, synthetic_model(args.workdir, preset, args.vocab)))
    sizes = [int(b) for b in args.batches.split(",")]
    results: dict[str, object] = {"device": name}
    records = []
    if device.type == "cuda":
        results["copy_bandwidth"] = copy_bandwidth()
    for label, path in models:
        print(f"{label} ({path})", flush=True)
        engine = Engine(path, device=args.device, context_size=args.ctx)
        entry: dict[str, object] = {}
        if args.check:
            entry["check"] = check(engine)
            print(f"  check: {entry['check']}", flush=True)
        if device.type == "cpu":
            entry["cpu"] = cpu_comparison(engine)
            print(f"  {entry['cpu']}", flush=True)
        else:
            entry["metallic"] = batch_sizes(engine, sizes)
            if args.kernels:
                entry["kernels"] = decode_kernels(engine, args.kernels)
            if args.host_profile:
                host_profile(engine, args.host_profile)
            records += [
                row(label, f"batch-{b}", "metallic", r["s_tg"], "tok/s")
                for b, r in entry["metallic"].items()
            ]
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.prefix:
            entry["prefix"] = prefix_workload(path, args.device, args.ctx)
            for state, r in entry["prefix"].items():
                records.append(
                    row(
                        label,
                        f"ttft-p50-prefix-cache-{state}",
                        "metallic",
                        r["ttft_p50"] * 1e3,
                        "ms",
                    )
                )
        if args.llama_bin:
            lc = llama_batched_bench(
                args.llama_bin / "llama-batched-bench", path, PROMPT, GENERATED, sizes
            )
            entry["llama.cpp"] = {b: r["S_TG t/s"] for b, r in lc.items()}
            records += [
                row(label, f"batch-{b}", "llama.cpp", v, "tok/s")
                for b, v in entry["llama.cpp"].items()
            ]
            bench = llama_bench(args.llama_bin / "llama-bench", path, 512, 128)
            entry["llama-bench"] = bench
            records += [row(label, t, "llama.cpp", v, "tok/s") for t, v in bench.items()]
        results[label] = entry
    print(f"\n{name}")
    print(f"{'model':<12} {'B':>4} {'metallic S_TG':>14} {'llama.cpp S_TG':>15} {'ratio':>6}")
    for label, _ in models:
        entry = results[label]
        for b, r in entry.get("metallic", {}).items():
            lc = entry.get("llama.cpp", {}).get(b)
            ratio = f"{r['s_tg'] / lc:.2f}" if lc else "-"
            print(f"{label:<12} {b:>4} {r['s_tg']:>14.0f} {lc or '-':>15} {ratio:>6}")
    (out_dir() / "batched.json").write_text(json.dumps(results, indent=1, default=str))
    if records:
        print("record:", write_record("batched", name, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
