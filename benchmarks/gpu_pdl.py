"""A decode-path switch off and on (programmatic dependent launch by default): same tokens and
logits, then the speed-up.

For a synthetic Gemma-3-270M-shaped model and the synthetic Llama-3-8B (both Q4_K_M; --model
adds a real GGUF), each setting of the variable (0, then 1) runs in a fresh process (METALLIC_PDL
is read once per device, and every kernel compiles again with its own PDL constexpr). --variable
takes the others: METALLIC_PREFETCH (weights asked of the L2 before the wait for the previous
kernel: the same arithmetic) and METALLIC_CUDA_GEMV (the CUDA C one-row products: the same
sums in another order, so tokens and logits are reported, not required equal):

1. Checks. Greedy tokens (graphs on, as `metallic bench` runs) after a fixed prompt; the logits
   of a few decode steps replayed from a captured CUDA graph, and the same steps run eagerly.
   The parent asserts both settings give identical tokens and bitwise-equal logits. For the
   Gemma-shaped models, the replayed logits also against metallic's torch path on the CPU
   (teacher-forced, same tokens): the decode kernels checked by a path that shares none.
2. The Triton kernels one decode step launches (counted by wrapping Triton's launcher).
3. Speed: one decode step's graph replayed, timed with CUDA events (median); then `metallic
   bench -p 16 -n 128` (tg128: 128 tokens after a 1-token prompt, graphs on), its JSON parsed.

Prints a table and writes gpu_pdl.json (gpu_metallic_prefetch.json, ...) to $OUT (or
benchmarks/results/).

    python benchmarks/gpu_pdl.py                      # on the GPU
    python benchmarks/gpu_pdl.py --model gemma.gguf   # the real Gemma 3 270M as well
    python benchmarks/gpu_pdl.py --variable METALLIC_PREFETCH
    TRITON_INTERPRET=1 python benchmarks/gpu_pdl.py --smoke   # tiny models on the CPU, no timing
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import out_dir, synthetic_model
from gpu_profile import event_us

from metallic import cli
from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.scheduler import Chunk
from metallic.engine.sequence import Sequence
from metallic.testing.synthetic import PRESETS, write_synthetic_model

PROMPT, GREEDY, LOGIT_STEPS, GENERATED = 24, 64, 4, 128
# Switches whose two settings must give the same bits (the others reorder sums).
EXACT = {"METALLIC_PDL": True, "METALLIC_PREFETCH": True, "METALLIC_CUDA_GEMV": False}
PRESETS_ON_GPU = ("gemma3-270m", "llama3-8b")
PRESETS_SMOKE = ("tiny-gemma3", "tiny-llama")


@contextlib.contextmanager
def counted_launches() -> Iterator[collections.Counter[str]]:
    """Counts the launches of every Triton kernel (compiled or interpreted) by name inside."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    counts: collections.Counter[str] = collections.Counter()
    classes = (jit.JITFunction, interpreter.InterpretedFunction)
    originals = [cls.run for cls in classes]

    def counting(original):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup"):
                counts[self.fn.__name__] += 1
            return original(self, *args, **kwargs)

        return run

    for cls, original in zip(classes, originals, strict=True):
        cls.run = counting(original)
    try:
        yield counts
    finally:
        for cls, original in zip(classes, originals, strict=True):
            cls.run = original


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(prompt, params)]


def decode_logits(engine: Engine, prompt: list[int], steps: int, graphed: bool) -> dict[str, Any]:
    """Logits of `steps` greedy decode steps after `prompt` (prefilled eagerly), each step a
    graph replay (`graphed`) or an eager forward; the kernels a step launches; and with graphs
    on the GPU, one step's replay time."""
    runner, store = engine.runner, engine.store
    seq = Sequence(
        0, 0, prompt, SamplingParams(), engine.tokenizer, len(store.n_blocks), engine.context_size
    )
    assert engine.blocks.reserve(seq, 0, len(prompt) + steps)
    graphs_on = runner.cuda_graphs
    try:
        runner.cuda_graphs = False
        prefill, _ = runner.prepare([Chunk(seq, 0, len(prompt))], None)
        logits = engine.model.forward(prefill, store)[-1:]
        runner.cuda_graphs = graphed
        rows = []
        for _ in range(steps):
            seq.token_ids.append(int(logits[0].argmax()))
            end = len(seq.token_ids)
            batch, used_graph = runner.prepare([Chunk(seq, end - 1, end)], None)
            assert used_graph == graphed
            logits = runner.execute(batch, used_graph)[:1].clone()
            rows.append(logits)
        out: dict[str, Any] = {"logits": torch.cat(rows).cpu()}
        out["inputs"] = seq.token_ids[len(prompt) :]
        # The last step once more (it rewrites the same KV rows with the same values).
        runner.cuda_graphs = False
        eager, _ = runner.prepare([Chunk(seq, end - 1, end)], None)
        with counted_launches() as counts:
            runner.execute(eager, False)
        out["kernels"] = dict(counts)
        if graphed:
            out["replay_us"] = event_us(lambda: runner.execute(batch, True), repeats=200)
        return out
    finally:
        runner.cuda_graphs = graphs_on
        engine.blocks.release(seq)


def against_cpu(
    path: Path, prompt: list[int], inputs: list[int], logits: torch.Tensor
) -> dict[str, float]:
    """Decode-step logits from the GPU against the CPU torch path's, teacher-forced on the same
    tokens: relative error and top-1 agreement."""
    cpu = Engine(path, device="cpu", dtype="f32", context_size=512, prefix_cache=False)
    ref = cpu.logits(prompt + inputs)[len(prompt) :]
    return {
        "cpu_rel_logit_err": float((logits - ref).norm() / ref.norm()),
        "cpu_argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def bench_tg(path: Path, label: str, doc: Path) -> dict[str, float]:
    """`metallic bench`'s tg128 (graphs on) in this process, its JSON in `doc`: mean and spread
    of tok/s."""
    args = ["bench", str(path), "--device", "cuda", "-p", "16", "-n", str(GENERATED)]
    args += ["-r", "5", "--name", label, "--json", str(doc)]
    assert cli.main(args) == 0, "metallic bench failed"
    results = json.loads(doc.read_text())["results"]
    (tg,) = [r for r in results if r["test"] == f"tg{GENERATED}"]
    return {"tg_ts": tg["avg_ts"], "tg_samples": tg["samples_ts"]}


def worker(args: argparse.Namespace) -> int:
    """One model under this process's setting; writes its results to args.result."""
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if on_gpu else "cpu"
    extra = {} if on_gpu else {"dtype": "f32"}
    engine = Engine(args.path, device=device, context_size=512, prefix_cache=False, **extra)
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(100, engine.config.vocab_size, (PROMPT,), generator=gen).tolist()
    n_greedy = GREEDY if on_gpu else 3
    result: dict[str, Any] = {"tokens": greedy(engine, prompt, n_greedy)}
    eager = decode_logits(engine, prompt, LOGIT_STEPS if on_gpu else 2, graphed=False)
    result["kernels"] = eager["kernels"]
    tensors = {"eager": eager["logits"]}
    if on_gpu:
        graphed = decode_logits(engine, prompt, LOGIT_STEPS, graphed=True)
        tensors["graphed"] = graphed["logits"]
        result["replay_us"] = graphed["replay_us"]
        if args.label.startswith("gemma"):
            result |= against_cpu(args.path, prompt, graphed["inputs"], graphed["logits"])
        del engine
        torch.cuda.empty_cache()
        result |= bench_tg(args.path, args.label, args.result.with_suffix(".bench.json"))
    torch.save(tensors, args.result.with_suffix(".pt"))
    args.result.write_text(json.dumps(result))
    return 0


def run_setting(
    path: Path, label: str, variable: str, value: int, smoke: bool, workdir: Path
) -> dict[str, Any]:
    """The worker for one model and value of `variable`, in a fresh process."""
    result = workdir / f"{label}-{variable.lower()}{value}.json"
    env = dict(os.environ, **{variable: str(value)})
    command = [sys.executable, __file__, "--worker", "--path", str(path), "--label", label]
    command += ["--result", str(result)] + (["--smoke"] if smoke else [])
    subprocess.run(command, env=env, check=True)
    out = json.loads(result.read_text())
    out["tensors"] = torch.load(result.with_suffix(".pt"))
    return out


def compare(label: str, off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """The checks between the switch off and on, and the speed figures side by side."""
    row: dict[str, Any] = {"model": label, "same_tokens": off["tokens"] == on["tokens"]}
    for kind, logits in off["tensors"].items():
        row[f"{kind}_logits_equal"] = torch.equal(logits, on["tensors"][kind])
        row[f"{kind}_logits_max_diff"] = float((logits - on["tensors"][kind]).abs().max())
    row["kernels_per_step"] = sum(on["kernels"].values())
    row["kernels"] = on["kernels"]
    for key in ("cpu_rel_logit_err", "cpu_argmax_agreement"):
        if key in on:
            row[key] = max(off[key], on[key]) if "err" in key else min(off[key], on[key])
    for key in ("replay_us", "tg_ts"):
        if key in off:
            row[f"{key}_off"], row[f"{key}_on"] = off[key], on[key]
    if "tg_ts" in off:
        row["tg_samples_off"], row["tg_samples_on"] = off["tg_samples"], on["tg_samples"]
        row["tg_speedup"] = on["tg_ts"] / off["tg_ts"]
        row["replay_speedup"] = off["replay_us"] / on["replay_us"]
    return row


def models(args: argparse.Namespace) -> list[tuple[str, Path]]:
    if args.smoke:
        out = []
        for preset in PRESETS_SMOKE:
            path = args.workdir / f"{preset}-2layers-Q8_0.gguf"
            if not path.exists():
                args.workdir.mkdir(parents=True, exist_ok=True)
                shape = dataclasses.replace(PRESETS[preset], n_layers=2)
                write_synthetic_model(path, shape, "Q8_0", seed=3)
            out.append((preset, path))
        return out
    found = [(f"{p}-q4_k_m", synthetic_model(args.workdir, p)) for p in PRESETS_ON_GPU]
    return ([("gemma3-270m-real", args.model)] if args.model else []) + found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a real GGUF to run as well (Gemma 3 270M)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, no timing")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-pdl"))
    parser.add_argument("--variable", choices=sorted(EXACT), default="METALLIC_PDL")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("METALLIC_FORCE_KERNELS", "1")
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    rows = []
    for label, path in models(args):
        off, on = (
            run_setting(path, label, args.variable, value, args.smoke, args.workdir)
            for value in (0, 1)
        )
        rows.append(compare(label, off, on))
        print(json.dumps({k: v for k, v in rows[-1].items() if "samples" not in k}), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    name = "gpu_pdl" if args.variable == "METALLIC_PDL" else f"gpu_{args.variable.lower()}"
    doc = {"device": device, "variable": args.variable, "rows": rows}
    (out_dir() / f"{name}.json").write_text(json.dumps(doc, indent=1))
    print(f"\n{device}, {args.variable} 0/1")
    print(
        f"{'model':<22} {'same':>5} {'kernels':>8} {'replay µs off/on':>18} "
        f"{'tg128 off/on':>14} {'vs CPU err/top1':>16}"
    )
    for r in rows:
        same = r["same_tokens"] and all(v for k, v in r.items() if k.endswith("_logits_equal"))
        replay = (
            f"{r['replay_us_off']:.1f}/{r['replay_us_on']:.1f}" if "replay_us_off" in r else "-"
        )
        tg = f"{r['tg_ts_off']:.0f}/{r['tg_ts_on']:.0f}" if "tg_ts_off" in r else "-"
        cpu = "-"
        if "cpu_rel_logit_err" in r:
            cpu = f"{r['cpu_rel_logit_err']:.1e}/{r['cpu_argmax_agreement']:.2f}"
        print(
            f"{r['model']:<22} {same!s:>5} {r['kernels_per_step']:>8} {replay:>18} {tg:>14} "
            f"{cpu:>16}"
        )
    failed = [r["model"] for r in rows if not r["same_tokens"]]
    failed += [r["model"] for r in rows for k, v in r.items() if k.endswith("_equal") and not v]
    if failed:
        print(f"{args.variable} changed the results of:", ", ".join(sorted(set(failed))))
        return 1 if EXACT[args.variable] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
