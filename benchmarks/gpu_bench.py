"""`metallic bench` and its profile on the GPU: checks first, then the README's figures.

For each model (the default Gemma 3 270M with --default, synthetic ones with --synthetic):

1. Checks. Greedy tokens with the profiler attached (CUDA graphs on, its events captured in
   them) equal those without. One decode step's forward as the profiler times it (events inside
   the graph) against the same step's graph replay timed from outside with CUDA events and no
   profiler: within 10%. The hooks' cost with profiling off: per graph replay the one empty call
   the runner makes; per eager step the empty calls the transformer makes, each timed.
2. Figures, as `metallic bench -p 512 -n 128 -b 1,8,32,64 -r 5 --profile --plot` computes them:
   pp512, tg128, batch-B (S_TG, 128-token prompts) with their spread; the profile of tg128's
   decode and pp512's prefill with the roofline against the device's limits, measured first as
   `metallic doctor --calibrate` does; the plot. With --llama-bin, llama-bench and
   llama-batched-bench on the same file; the bandwidth floor of tg128 beside them.

Writes to $OUT (or benchmarks/results/): per model the bench JSON (metallic bench's schema),
its plot PNG and its profile tables (markdown), gpu_bench.json, and one record of every model's
rows (benchmarks/common.py). Prints the checks, a table and each decode's top three ops.

    python benchmarks/gpu_bench.py --default --synthetic llama3-8b --llama-bin ~/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Any

import torch
from common import device_name, llama_batched_bench, llama_bench, out_dir, row, write_record
from gpu_profile import event_us

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.scheduler import Chunk
from metallic.engine.sequence import Sequence
from metallic.gguf.default_model import default_model_path
from metallic.runtime import calibration
from metallic.runtime.batch import StepBatch
from metallic.runtime.device import choose_dtype
from metallic.runtime.profiler import OFF
from metallic.testing.synthetic import write_synthetic_model
from metallic.tools import bench
from metallic.tools.plot import plot_bench
from metallic.tools.profiling import ProfileSession, format_report

SETTINGS = bench.Settings(prompt=[512], generate=[128], batch=[1, 8, 32, 64], batch_prompt=128)


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(prompt, params)]


def decode_step(engine: Engine, prompt: list[int]) -> tuple[StepBatch, bool, Sequence]:
    """A decode step of one sequence after `prompt` (its prefill computed), padded for a graph
    when the runner uses graphs."""
    runner, store = engine.runner, engine.store
    seq = Sequence(
        0, 0, prompt, SamplingParams(), engine.tokenizer, len(store.n_blocks), engine.context_size
    )
    assert engine.blocks.reserve(seq, 0, len(prompt) + 1)
    graphs, runner.cuda_graphs = runner.cuda_graphs, False
    prefill, _ = runner.prepare([Chunk(seq, 0, len(prompt))], None)
    runner.cuda_graphs = graphs
    engine.model.forward(prefill, store)
    seq.token_ids.append(7)
    batch, graphed = runner.prepare([Chunk(seq, len(prompt), len(prompt) + 1)], None)
    return batch, graphed, seq


def checks(engine: Engine) -> dict[str, object]:
    out: dict[str, object] = {}
    prompt = bench.random_prompts(engine.config.vocab_size, 1, 64, seed=5)[0]
    expected = greedy(engine, prompt, 32)
    session = ProfileSession(engine)
    got = greedy(engine, prompt, 32)
    session.stop()
    out["profiled_same_greedy_tokens"] = got == expected

    batch, graphed, seq = decode_step(engine, prompt)
    runner = engine.runner
    out["replay_us"] = event_us(lambda: runner.execute(batch, graphed))  # no profiler
    session = ProfileSession(engine)
    runner.execute(batch, graphed)  # captures the graph with the profiler's events
    session.reset()
    for _ in range(20):
        runner.execute(batch, graphed)
    decode = session.phases()["decode"]
    out["profiled_replay_us"] = event_us(lambda: runner.execute(batch, graphed))
    session.stop()
    engine.blocks.release(seq)
    out["profiled_forward_us"] = decode.forward / decode.steps * 1e6
    out["op_sum_us"] = sum(decode.ops.values()) / decode.steps * 1e6
    ratio = out["profiled_forward_us"] / out["replay_us"]
    out["forward_within_10pct_of_replay"] = abs(ratio - 1) < 0.1

    # Profiling off: one empty call per graph replay, and a dozen per layer of an eager step.
    graphs, runner.cuda_graphs = runner.cuda_graphs, False
    calls = 5 + 9 * engine.config.n_layers  # begin, 3 marks outside the layers, end; 9 a layer
    call_s = min(timeit.repeat(lambda: OFF.mark("qkv", 3), number=10_000, repeat=5)) / 10_000
    batch, _, seq = decode_step(engine, prompt)
    eager_us = event_us(lambda: runner.execute(batch, False))
    engine.blocks.release(seq)
    runner.cuda_graphs = graphs
    out["hooks_off_eager_fraction"] = calls * call_s * 1e6 / eager_us
    out["hooks_off_graph_fraction"] = call_s * 1e6 / out["replay_us"]
    return out


def run_model(label: str, path: Path, args: argparse.Namespace) -> dict[str, object]:
    settings = SETTINGS
    engine = Engine(
        path,
        device="cuda",
        context_size=settings.context(),
        max_num_seqs=max(settings.batch),
        prefix_cache=False,
    )
    result: dict[str, object] = {"checks": checks(engine)}
    print(label, json.dumps(result["checks"]), flush=True)
    results = bench.run_tests(engine, settings, lambda text: print(f"  {label} {text}", flush=True))
    doc = bench.bench_document(engine, settings, results, name=label)
    doc["profile"] = bench.profile_tests(engine, settings)
    out = out_dir()
    (out / f"bench-{label}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot_bench(doc, out / f"bench-{label}.png")
    (out / f"profile-{label}.md").write_text(format_report(doc["profile"]) + "\n")
    print(bench.format_table(doc), flush=True)
    result["bench"] = doc
    weights = engine.model.weights
    read = weights.nbytes - (0 if weights.embedding is weights.output else weights.embedding.nbytes)
    result["bytes_per_token"] = read
    del engine
    torch.cuda.empty_cache()
    if args.llama_bin:
        lc = llama_bench(args.llama_bin / "llama-bench", path, 512, 128)
        batched = llama_batched_bench(
            args.llama_bin / "llama-batched-bench", path, 128, 128, settings.batch
        )
        result["llama.cpp"] = lc | {f"batch-{b}": r["S_TG t/s"] for b, r in batched.items()}
    return result


def top_ops(doc: dict, n: int = 3) -> list[str]:
    ops = [r for r in doc["profile"]["phases"]["decode"]["ops"] if "bound" in r]
    return [
        f"{r['op']} {r['ms']:.3f} ms ({100 * r['share']:.0f}%), {r['gb_s']:,.0f} GB/s = "
        f"{100 * r['limit_fraction']:.0f}% of the {r['bound']} limit"
        for r in ops[:n]
    ]


def print_tables(results: dict[str, Any], labels: list[str], copy_bandwidth: float) -> None:
    print(f"\n{results['device']}; copy {copy_bandwidth / 1e12:.2f} TB/s")
    print(f"{'model':<20} {'check':<34} value")
    for label in labels:
        for name, value in results[label]["checks"].items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{label:<20} {name:<34} {shown}")
    print(f"\n{'model':<20} {'test':<9} {'metallic':>10} {'± std':>8} {'llama.cpp':>10}")
    for label in labels:
        r = results[label]
        for t in r["bench"]["results"]:
            lc = r.get("llama.cpp", {}).get(t["test"])
            metallic = f"{t['avg_ts']:>10.0f} {t['stddev_ts']:>8.1f}"
            print(f"{label:<20} {t['test']:<9} {metallic} {f'{lc:.0f}' if lc else '-':>10}")
        print(f"{label}: decode's top ops: " + "; ".join(top_ops(r["bench"])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", action="store_true", help="the default Gemma 3 270M")
    parser.add_argument("--synthetic", action="append", default=[], help="preset: llama3-8b")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp's build/bin for baselines")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    args = parser.parse_args()
    device = torch.device("cuda")
    limits = calibration.measure(device, choose_dtype(device))
    calibration.save(limits)
    print(f"limits: {vars(limits)}", flush=True)
    models = [("gemma3-270m-q4_k_m", default_model_path())] if args.default else []
    args.workdir.mkdir(parents=True, exist_ok=True)
    for preset in args.synthetic:
        path = args.workdir / f"{preset}-Q4_K_M.gguf"
        if not path.exists():
            write_synthetic_model(path, preset, "Q4_K_M")
        models.append((f"{preset}-q4_k_m", path))
    results: dict[str, Any] = {"device": device_name(device), "limits": vars(limits)}
    records = []
    for label, path in models:
        r = run_model(label, path, args)
        results[label] = r
        doc = r["bench"]
        records += [row(label, t["test"], "metallic", t["avg_ts"], "tok/s") for t in doc["results"]]
        floor = limits.copy_bandwidth / r["bytes_per_token"]
        records.append(row(label, "tg128", "floor", floor, "tok/s"))
        for test, value in r.get("llama.cpp", {}).items():
            records.append(row(label, test, "llama.cpp", value, "tok/s"))
    print_tables(results, [label for label, _ in models], limits.copy_bandwidth)
    (out_dir() / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    print("record:", write_record("bench", results["device"], records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
