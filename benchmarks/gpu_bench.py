"""`metallic bench` on the GPU beside llama.cpp: checks first, then the figures of BENCHMARKS.md.

For the real Gemma 3 270M Q4_K_M (--model PATH) and synthetic models (--synthetic llama3-8b):

1. Checks, on an engine of their own. Greedy tokens with the profiler attached (CUDA graphs on,
   its events captured in them) equal those without; an eager decode step with the hooks
   compiled out (the transformer's forward and blocks rebuilt without a single hook call) gives
   the same logits as with the hooks present but off.
2. What profiling costs. One decode step's graph replayed and timed from outside with CUDA
   events: without a profiler, and with a profiler timing every op or the GPU's op groups (what
   `--profile` uses): the forward as each profiler measures it against the plain replay. With
   profiling off: an eager decode step and a graph replay with the hooks present but off
   against compiled out, interleaved, medians, as a fraction of the step; beside them the cost
   of one empty hook call times the calls a step makes.
3. `metallic bench MODEL -p 512 -n 128 -b 1,8,32,64 -r R --profile --json --plot` itself (the
   command line, in this process), after the device's limits are measured as `metallic doctor
   --calibrate` does: pp512, tg128, batch-B (S_TG) timed with CUDA events, the profile of
   tg128's decode and pp512's prefill with the roofline, the plot.
   --no-checks skips 1 and 2.
4. With --llama-bin: llama-bench (pp512, tg128) and llama-batched-bench (S_TG at the same B)
   on the same file; the bandwidth floor of tg128 (weight bytes read a token over the copy
   bandwidth). Synthetic files load in llama.cpp with a real vocabulary: --vocab.

Writes to $OUT (or benchmarks/results/): per model `bench-MODEL.json` (metallic bench's JSON),
`bench-MODEL.png` and `profile-MODEL.md`; gpu_bench.json (checks and costs); and the record
`bench-DATE.json` (benchmarks/common.py). Prints the checks, the tables of BENCHMARKS.md
(benchmarks/tables.py) and each decode's top three ops.

    python benchmarks/gpu_bench.py --model gemma.gguf --synthetic llama3-8b \\
        --vocab ../shared/vocab/ggml-vocab-llama-bpe.gguf --llama-bin ~/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import inspect
import json
import statistics
import sys
import textwrap
import timeit
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from common import (
    device_name,
    llama_batched_bench,
    llama_bench,
    out_dir,
    row,
    synthetic_model,
    write_record,
)
from gpu_profile import event_us
from tables import render

from metallic import cli
from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.scheduler import Chunk
from metallic.engine.sequence import Sequence
from metallic.models import transformer
from metallic.runtime import calibration
from metallic.runtime.batch import StepBatch
from metallic.runtime.device import choose_dtype
from metallic.runtime.profiler import OFF, Hooks
from metallic.tools import bench
from metallic.tools.profiling import ProfileSession, format_report

PROMPT, GENERATED, BATCHES = 512, 128, [1, 8, 32, 64]
BATCH_PROMPT = 128  # metallic bench's --batch-prompt default, llama-batched-bench's -npp here
HOOK_METHODS = ("forward", "_block")  # the Transformer methods that call the hooks


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


class _HookCalls(ast.NodeTransformer):
    """Removes every statement that is only a hook call: `profiler.begin/mark/end(...)` and
    `mark(...)` (the bound method a block keeps)."""

    def __init__(self) -> None:
        self.removed = 0

    @staticmethod
    def is_hook_call(node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        f = node.func
        bound = isinstance(f, ast.Name) and f.id == "mark"
        method = (
            isinstance(f, ast.Attribute)
            and isinstance(f.value, ast.Name)
            and f.value.id == "profiler"
            and f.attr in ("begin", "mark", "end")
        )
        return bound or method

    def visit_Expr(self, node: ast.Expr) -> ast.Expr | None:
        if self.is_hook_call(node.value):
            self.removed += 1
            return None
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        if isinstance(getattr(node, "body", None), list) and not node.body:
            node.body = [ast.Pass()]  # type: ignore[attr-defined]  # a block left empty
        return node


def compiled_out_methods() -> tuple[dict[str, Callable[..., Any]], int]:
    """Transformer's hook-calling methods rebuilt from their source without the hook calls
    (the profiler compiled out), and how many calls were removed."""
    stripper = _HookCalls()
    methods = {}
    for name in HOOK_METHODS:
        source = textwrap.dedent(inspect.getsource(getattr(transformer.Transformer, name)))
        tree = ast.fix_missing_locations(stripper.visit(ast.parse(source)))
        left = [n for n in ast.walk(tree) if _HookCalls.is_hook_call(n)]
        assert not left, f"{name}: hook calls inside expressions: {ast.unparse(left[0])}"
        # Compiled under this file's `from __future__ import annotations`, as transformer.py is.
        code = compile(tree, f"<{name} without hooks>", "exec")
        namespace: dict[str, Any] = {}
        exec(code, vars(transformer), namespace)
        methods[name] = namespace[name]
    assert stripper.removed > 0
    return methods, stripper.removed


@contextlib.contextmanager
def hooks_compiled_out(model: transformer.Transformer) -> Iterator[int]:
    """The model runs the compiled-out methods inside; yields the hook calls removed."""
    methods, removed = compiled_out_methods()
    for name, function in methods.items():
        setattr(model, name, types.MethodType(function, model))
    try:
        yield removed
    finally:
        for name in methods:
            delattr(model, name)


class CountingHooks(Hooks):
    """Hooks that count the calls a step makes."""

    def __init__(self) -> None:
        self.calls = 0

    def begin(self, batch: StepBatch, every_row: bool) -> None:
        self.calls += 1

    def mark(self, kind: str, layer: int = -1) -> None:
        self.calls += 1

    def end(self, logits: torch.Tensor) -> None:
        self.calls += 1


def once_us(fn: Callable[[], object]) -> float:
    """Microseconds of one call of `fn` on the device's stream, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def hooks_present_vs_compiled_out(
    model: transformer.Transformer, fn: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Median microseconds of `fn` with the hooks present but off and with them compiled out,
    timed alternately, one call each a round, so that drift falls on both."""
    present, compiled_out = [], []
    fn()
    for _ in range(rounds):
        present.append(once_us(fn))
        with hooks_compiled_out(model):
            compiled_out.append(once_us(fn))
    return statistics.median(present), statistics.median(compiled_out)


def profiled_replay(engine: Engine, batch: StepBatch, every_op: bool) -> dict[str, float]:
    """The decode graph replayed with a profiler attached: the forward it measures, its
    stamps, and the replay timed from outside."""
    runner = engine.runner
    session = ProfileSession(engine, every_op=every_op)
    try:
        runner.execute(batch, True)  # captures the graph with the profiler's events
        session.reset()
        for _ in range(20):
            runner.execute(batch, True)
        decode = session.phases()["decode"]
        replay_us = event_us(lambda: runner.execute(batch, True))
    finally:
        session.stop()
    return {
        "forward_us": decode.forward / decode.steps * 1e6,
        "op_sum_us": sum(decode.ops.values()) / decode.steps * 1e6,
        "stamps": decode.stamps / decode.steps,
        "replay_us": replay_us,
    }


def checks(engine: Engine) -> dict[str, object]:
    """Sections 1 and 2 of the module's docstring."""
    prompt = bench.random_prompts(engine.config.vocab_size, 1, 64, seed=5)[0]
    expected = greedy(engine, prompt, 32)
    session = ProfileSession(engine)
    got = greedy(engine, prompt, 32)
    session.stop()
    out: dict[str, object] = {"profiled_same_greedy_tokens": got == expected}
    out |= hooks_off_eager(engine, prompt)
    out |= profiling_on_and_off_in_graphs(engine, prompt)
    return out


def hooks_off_eager(engine: Engine, prompt: list[int]) -> dict[str, object]:
    """An eager decode step with the hooks compiled out: its logits, and its time against the
    hooks present but off, measured and estimated (empty calls the step makes x one's cost)."""
    runner, model = engine.runner, engine.model
    graphs, runner.cuda_graphs = runner.cuda_graphs, False
    batch, _, seq = decode_step(engine, prompt)
    runner.cuda_graphs = graphs
    out: dict[str, object] = {}
    try:
        expected = runner.execute(batch, False).clone()
        with hooks_compiled_out(model) as removed:
            out["hook_calls_compiled_out"] = removed
            out["compiled_out_same_logits"] = torch.equal(runner.execute(batch, False), expected)
        present_us, compiled_out_us = hooks_present_vs_compiled_out(
            model, lambda: runner.execute(batch, False), rounds=21
        )
        counter = CountingHooks()
        model.profiler = counter
        runner.execute(batch, False)
    finally:
        model.profiler = OFF
        engine.blocks.release(seq)
    call_s = min(timeit.repeat(lambda: OFF.mark("qkv", 3), number=10_000, repeat=5)) / 10_000
    out["hook_call_ns"] = call_s * 1e9
    out["hook_calls_eager_step"] = counter.calls
    out["hooks_off_eager_present_us"] = present_us
    out["hooks_off_eager_compiled_out_us"] = compiled_out_us
    out["hooks_off_eager_fraction"] = present_us / compiled_out_us - 1
    out["hooks_off_eager_estimate"] = counter.calls * call_s * 1e6 / compiled_out_us
    return out


def profiling_on_and_off_in_graphs(engine: Engine, prompt: list[int]) -> dict[str, object]:
    """A decode step's graph: the forward that a profiler timing every op, or the GPU's groups,
    measures against the plain replay; with profiling off, the one hook call a replay makes
    (runner.execute against graphs.run, which also skips the runner's check that its graphs
    are current)."""
    runner = engine.runner
    batch, graphed, seq = decode_step(engine, prompt)
    assert graphed, "decode steps of one sequence replay as graphs"
    out: dict[str, object] = {}
    try:
        plain_us = event_us(lambda: runner.execute(batch, True))
        out["replay_us"] = plain_us
        for mode, every_op in (("every_op", True), ("groups", False)):
            r = profiled_replay(engine, batch, every_op)
            ratio = r["forward_us"] / plain_us
            out[f"profiled_{mode}_stamps"] = r["stamps"]
            out[f"profiled_{mode}_forward_us"] = r["forward_us"]
            out[f"profiled_{mode}_over_replay"] = ratio
            out[f"profiled_{mode}_within_10pct"] = abs(ratio - 1) < 0.1
            out[f"profiled_{mode}_ops_sum_to_forward"] = (
                abs(r["op_sum_us"] - r["forward_us"]) <= 1e-6 * r["forward_us"]
            )
        runner.execute(batch, True)  # captured again, without the profilers' events
        graphs = runner.graphs
        assert graphs is not None
        times: list[list[float]] = [[], []]
        for _ in range(51):
            times[0].append(once_us(lambda: runner.execute(batch, True)))
            times[1].append(once_us(lambda: graphs.run(batch)))
    finally:
        engine.blocks.release(seq)
    present_us, compiled_out_us = (statistics.median(t) for t in times)
    call_s = min(timeit.repeat(lambda: OFF.replayed(None, batch), number=10_000, repeat=5))
    out["hooks_off_replay_present_us"] = present_us
    out["hooks_off_replay_compiled_out_us"] = compiled_out_us
    out["hooks_off_replay_fraction"] = present_us / compiled_out_us - 1
    out["hooks_off_replay_estimate"] = call_s / 10_000 * 1e6 / compiled_out_us
    return out


def bench_command(label: str, path: Path, repetitions: int) -> tuple[list[str], Path]:
    """`metallic bench`'s arguments for `path` and the JSON file they write."""
    out = out_dir()
    doc = out / f"bench-{label}.json"
    args = [
        "bench", str(path), "--device", "cuda", "-p", str(PROMPT), "-n", str(GENERATED),
        "-b", ",".join(map(str, BATCHES)), "--batch-prompt", str(BATCH_PROMPT),
        "-r", str(repetitions), "--profile", "--name", label, "--json", str(doc),
        "--plot", str(out / f"bench-{label}.png"),
    ]  # fmt: skip
    return args, doc


def run_model(label: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    engine = Engine(path, device="cuda", context_size=256, prefix_cache=False)  # the checks'
    result: dict[str, Any] = {"path": str(path), "checks": {} if args.no_checks else checks(engine)}
    print(label, json.dumps(result["checks"]), flush=True)
    weights = engine.model.weights
    tied = weights.embedding is weights.output
    result["bytes_per_token"] = weights.nbytes - (0 if tied else weights.embedding.nbytes)
    del engine
    gc.collect()
    torch.cuda.empty_cache()

    command, doc_path = bench_command(label, path, args.repetitions)
    print("metallic " + " ".join(command), flush=True)
    code = cli.main(command)
    assert code == 0, f"metallic bench exited with {code}"
    result["bench"] = json.loads(doc_path.read_text())
    profile = format_report(result["bench"]["profile"])
    (out_dir() / f"profile-{label}.md").write_text(profile + "\n")
    gc.collect()
    torch.cuda.empty_cache()

    if args.llama_bin:
        lc = llama_bench(args.llama_bin / "llama-bench", path, PROMPT, GENERATED)
        batched = llama_batched_bench(
            args.llama_bin / "llama-batched-bench", path, BATCH_PROMPT, GENERATED, BATCHES
        )
        result["llama.cpp"] = lc | {f"batch-{b}": r["S_TG t/s"] for b, r in batched.items()}
    return result


def top_ops(doc: dict[str, Any], copy_bandwidth: float, n: int = 3) -> list[str]:
    """The decode profile's `n` slowest ops with the roofline (their rows come sorted)."""
    ops = [r for r in doc["profile"]["phases"]["decode"]["ops"] if "bound" in r]
    return [
        f"{r['op']} {r['ms']:.3f} ms ({100 * r['share']:.0f}% of the step), "
        f"{r['gb_s']:,.0f} GB/s = {100 * r['gb_s'] * 1e9 / copy_bandwidth:.0f}% of the copy "
        f"bandwidth ({100 * r['limit_fraction']:.0f}% of its {r['bound']} limit)"
        for r in ops[:n]
    ]


def records(label: str, r: dict[str, Any], copy_bandwidth: float) -> list[dict[str, object]]:
    rows = [row(label, t["test"], "metallic", t["avg_ts"], "tok/s") for t in r["bench"]["results"]]
    rows += [
        row(label, test, "llama.cpp", v, "tok/s") for test, v in r.get("llama.cpp", {}).items()
    ]
    rows.append(
        row(label, f"tg{GENERATED}", "floor", copy_bandwidth / r["bytes_per_token"], "tok/s")
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the real Gemma 3 270M Q4_K_M GGUF")
    parser.add_argument("--synthetic", action="append", default=[], help="preset: llama3-8b")
    parser.add_argument("--vocab", type=Path, help="vocab GGUF for synthetic files (llama.cpp)")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp's build/bin for baselines")
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="of each bench test")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    parser.add_argument(
        "--no-checks", action="store_true", help="skip sections 1 and 2 (figures only, faster)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if args.llama_bin and args.synthetic and not args.vocab:
        parser.error("llama.cpp loads synthetic files with a real vocabulary: give --vocab")
    device = torch.device("cuda")
    limits = calibration.measure(device, choose_dtype(device))
    calibration.save(limits)
    print(f"limits: {vars(limits)}", flush=True)
    models = [("gemma3-270m-q4_k_m", args.model)] if args.model else []
    for preset in args.synthetic:
        models.append((f"{preset}-q4_k_m", synthetic_model(args.workdir, preset, args.vocab)))
    results: dict[str, Any] = {"device": device_name(device), "limits": vars(limits)}
    rows = []
    for label, path in models:
        results[label] = run_model(label, path, args)
        rows += records(label, results[label], limits.copy_bandwidth)
    (out_dir() / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    record_path = write_record("bench", results["device"], rows)

    print(f"\n{results['device']}; copy {limits.copy_bandwidth / 1e12:.2f} TB/s")
    print(f"{'model':<20} {'check':<40} value")
    for label, _ in models:
        for name, value in results[label]["checks"].items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{label:<20} {name:<40} {shown}")
    record = json.loads(record_path.read_text())
    print()
    print(render(record, [results[label]["bench"] for label, _ in models], record_path.name))
    for label, _ in models:
        top = top_ops(results[label]["bench"], limits.copy_bandwidth)
        print(f"{label}: decode's top ops: " + "; ".join(top))
    print("record:", record_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
