"""CPU generation speed and memory of metallic, beside llama.cpp in the same run.

Measures prompt processing (tokens/s over a prompt of --prompt-tokens) and decode (tokens/s over
--tokens greedy steps) on the default model (or MODEL), plus the process's peak RSS. With
--llama-python pointing at a Python that has llama-cpp-python, llama.cpp runs the same test in a
child process with the same thread count. Prints a table and writes JSON.

    python benchmarks/cpu_generate.py [MODEL] [--llama-python /root/llvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

LLAMA_CPP_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, n_prompt, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False)
prompt = [2] + [1000 + i % 5000 for i in range(n_prompt - 1)]
llm.eval(prompt[:8]); llm.reset()  # warm up
t = time.perf_counter(); llm.eval(prompt); pp = time.perf_counter() - t
t = time.perf_counter()
for i in range(n_gen):
    llm.eval([1000 + i])
tg = time.perf_counter() - t
print(json.dumps({"pp_tok_s": n_prompt / pp, "tg_tok_s": n_gen / tg}))
"""


def measure_metallic(model: str | None, n_prompt: int, n_gen: int) -> dict[str, float]:
    import torch

    from metallic.engine.engine import Engine
    from metallic.engine.sampling import SamplingParams

    began = time.perf_counter()
    engine = Engine(model, device="cpu", context_size=2048)
    load_s = time.perf_counter() - began
    prompt = [2] + [1000 + i % 5000 for i in range(n_prompt - 1)]
    greedy = SamplingParams(temperature=0.0, max_tokens=n_gen, ignore_eos=True)
    for _ in engine.generate_tokens(prompt[:8], SamplingParams(temperature=0.0, max_tokens=4)):
        pass  # warm up
    steps = list(engine.generate_tokens(prompt, greedy))
    stats = engine.last_stats
    assert len(steps) == n_gen
    return {
        "load_s": load_s,
        "pp_tok_s": n_prompt / stats.prefill_seconds,
        "tg_tok_s": stats.decode_tokens_per_second,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "weights_mb": engine.model.weights.nbytes / 2**20,
    }


def measure_llama_cpp(python: str, model: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    out = subprocess.run(
        [python, "-c", LLAMA_CPP_CHILD, model, str(n_prompt), str(n_gen), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--llama-python", default=None, help="python with llama-cpp-python")
    args = parser.parse_args()

    from metallic.gguf.default_model import default_model_path

    model = args.model or str(default_model_path())
    rows = {"metallic": measure_metallic(model, args.prompt_tokens, args.tokens)}
    if args.llama_python:
        threads = int(rows["metallic"]["threads"])
        rows["llama.cpp"] = measure_llama_cpp(
            args.llama_python, model, args.prompt_tokens, args.tokens, threads
        )
    print(f"model: {Path(model).name}; prompt {args.prompt_tokens} tokens, decode {args.tokens}")
    print(f"{'engine':<10} {'pp tok/s':>10} {'tg tok/s':>10} {'peak RSS MB':>12}")
    for name, r in rows.items():
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        print(f"{name:<10} {r['pp_tok_s']:>10.1f} {r['tg_tok_s']:>10.1f} {rss:>12}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cpu_generate.json"
    out.write_text(json.dumps({"model": model, "args": vars(args), "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
