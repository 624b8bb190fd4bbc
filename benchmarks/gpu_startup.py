"""How long a user waits for `metallic run` on the GPU, against a bare `import torch`.

One command; whole processes timed from outside, in the same call (medians of --reps):

1. bare: `python -c "import torch; torch.cuda.init()"`, the floor of any torch program (after
   one untimed run that brings torch's libraries into the page cache).
2. cold: `python -m metallic run MODEL -p "The capital of France is" -n 32 --temp 0` with an
   empty TRITON_CACHE_DIR and an empty metallic cache (no compile marker): the first run after
   an install. Its stderr must say that it compiles kernels.
3. warm: the same command again, --reps times: its text must equal the cold run's, and its
   stderr must say nothing of compiling.
4. llama.cpp, with --llama-bin: `llama-simple` on the same file and prompt, 32 tokens, all
   layers on the GPU (else `llama-bench -p 6 -n 32 -r 1`), as a whole process.
5. phases: a child process, with warm caches and again with empty ones, times import torch,
   CUDA init, import triton, import metallic, `Engine(...)` and its parts (file, tokenizer and
   whether its tables came from metallic's cache, weights,
   KV cache, runner), the first `generate` (prompt and decode, graph captures and the parallel
   compiles ahead of a first run's steps among them) and a second one; Triton's kernels found
   in its cache or compiled (the slowest named; how many compiled on the compile-ahead threads
   and how many on the main thread, which a first run should not need), the time their first
   launches took (module loads) and the hash of its installation that keys its cache
   (`triton_key`). With --profile the warm child also writes its cProfile, by cumulative time.
6. load-8b: the synthetic Llama-3-8B Q4_K_M (written to --workdir if missing) is read once into
   the page cache, then loaded by two child processes; each times `Engine(...)` after its
   imports and CUDA init and generates 8 greedy tokens, which must agree. The second load is
   the figure (the target: 1.5 s).

Prints a table and writes gpu_startup.json and a record (benchmarks/common.py: tests
startup-bare, startup-cold, startup-warm, load-8b; engines floor, metallic, llama.cpp) to $OUT
or benchmarks/results/. Exits 1 when a check fails.

    python benchmarks/gpu_startup.py --model gemma-3-270m-q4_k_m.gguf [--llama-bin DIR] [--profile]

`--smoke` runs it all on the CPU (a tiny synthetic model in the 8B's place) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT = "The capital of France is"
GENERATED = 32
NOTICE = "compiling GPU kernels (first run"  # a first run says this before compiling
BARE = "import torch; torch.cuda.init()"
SMOKE_BARE = "import torch"  # --smoke: the CPU has no CUDA to initialize


def start_device() -> bool:
    """Initialize CUDA and make its context, where there is one (--smoke runs on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.init()
    torch.empty(1, device="cuda")
    return True


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child_env(triton_cache: Path, metallic_cache: Path) -> dict[str, str]:
    """The environment of every child: this checkout first on the path, the given caches."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(triton_cache)
    env["METALLIC_CACHE"] = str(metallic_cache)
    env.pop("METALLIC_FORCE_KERNELS", None)
    return env


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    """Seconds a whole process took, and its stdout and stderr; a failure stops the run."""
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    seconds = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, proc.stdout, proc.stderr


def run_command(model: Path) -> list[str]:
    return [
        sys.executable, "-m", "metallic", "run", str(model), "-p", PROMPT,
        "-n", str(GENERATED), "--temp", "0",
    ]  # fmt: skip


def llama_command(bin_dir: Path, model: Path) -> tuple[str, list[str]]:
    """The llama.cpp program doing the same work: llama-simple, else llama-bench."""
    simple = bin_dir / "llama-simple"
    if simple.exists():
        return "llama-simple", [
            str(simple), "-m", str(model), "-n", str(GENERATED), "-ngl", "99", PROMPT,
        ]  # fmt: skip
    bench = [str(bin_dir / "llama-bench"), "-m", str(model), "-ngl", "99", "-fa", "1"]
    return "llama-bench", [*bench, "-p", "6", "-n", str(GENERATED), "-r", "1"]


# The children: each prints one JSON line last.


def _wrap(owner: Any, name: str, times: dict[str, float], label: str) -> None:
    """Add the seconds every call of `owner.name` takes to `times[label]`."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - began

    setattr(owner, name, wrapper)


def _triton_counters(times: dict[str, float]) -> dict[str, Any]:
    """Count Triton's kernels found in its cache and compiled (each compile's kernel and
    seconds), and time their first launches (module loads; launcher builds when cold)."""
    import triton.knobs
    from triton.compiler.compiler import CompiledKernel

    counts: dict[str, Any] = {
        "kernels cached": 0,
        "cache lookup seconds": 0.0,  # keying, reading the cached files, making the kernel
        "kernels compiled": 0,
        "compile seconds": 0.0,  # summed over threads: more than the wall time when parallel
        "compiled ahead (pool threads)": 0,
        "compiled on the main thread": 0,
    }
    compiles: list[tuple[str, float]] = []

    def listen(*, cache_hit: bool, times: Any, metadata: dict[str, Any], **_: Any) -> None:
        seconds = times.total / 1e6
        if cache_hit:
            counts["kernels cached"] += 1
            counts["cache lookup seconds"] += seconds
        else:
            counts["kernels compiled"] += 1
            counts["compile seconds"] += seconds
            compiles.append((str(metadata.get("name")), seconds))
            ahead = threading.current_thread().name.startswith("metallic-compile")
            counts["compiled ahead (pool threads)" if ahead else "compiled on the main thread"] += 1

    triton.knobs.compilation.listener = listen
    _wrap(CompiledKernel, "_init_handles", times, "first launches (module, launcher)")
    counts["compiles"] = compiles
    return counts


class Laps:
    """Seconds since the previous lap, by label."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, label: str) -> None:
        now = time.perf_counter()
        self.times[label] = now - self.last
        self.last = now


def child_phases(model: Path, profile: Path | None) -> dict[str, Any]:
    """Phase times of one warm process (see the module docstring, 5)."""
    lap = Laps()
    import torch  # noqa: F401  (its import is what this lap times)

    lap("import torch")
    start_device()
    lap("CUDA init")
    import triton  # noqa: F401

    lap("import triton")
    from metallic.engine import engine
    from metallic.runtime.graphs import StepGraphs

    lap("import metallic")
    parts: dict[str, float] = {}
    load_parts(parts)
    _wrap(StepGraphs, "_capture", parts, "graph captures")
    counts = _triton_counters(parts)
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    lap.last = time.perf_counter()  # the hooks are not the engine's
    eng = engine.Engine(model)
    lap("Engine(...)")
    text = eng.generate(PROMPT, max_tokens=GENERATED, temperature=0)
    synchronize()
    stats = eng.last_stats
    lap("first generate")
    eng.generate(PROMPT, max_tokens=GENERATED, temperature=0)
    synchronize()
    lap("second generate")
    if profiler is not None:
        import pstats

        profiler.disable()
        with profile.open("w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(80)
    from triton.runtime.cache import triton_key

    triton_key.cache_clear()
    hashed = time.perf_counter()
    triton_key()
    return {
        "phases": lap.times,
        "parts": parts,
        "first generate": {"prompt": stats.prefill_seconds, "decode": stats.decode_seconds},
        "triton": {**counts, "triton_key seconds": time.perf_counter() - hashed},
        "text": text,
    }


def load_parts(parts: dict[str, float]) -> None:
    """Time the parts of `Engine(...)` into `parts`, by label."""
    from metallic.engine import engine, loader, model_runner
    from metallic.gguf import tokenizer_cache
    from metallic.gguf.tokenizer import Tokenizer

    for owner, name, label in [
        (loader, "open_gguf", "open file"),
        (Tokenizer, "from_metadata", "tokenizer"),
        (loader, "load_weights", "weights"),
        (loader, "Transformer", "model"),
        (engine, "KVStore", "KV cache"),
        (engine, "ModelRunner", "runner (compile marker)"),
        (model_runner, "compile_ahead", "compile ahead (first run, in generate)"),
    ]:
        _wrap(owner, name, parts, label)
    load_entry = tokenizer_cache.load

    def load_and_count(*args: Any) -> Any:
        tables = load_entry(*args)
        parts["tokenizer cache hit (1) or miss (0)"] = float(tables is not None)
        return tables

    tokenizer_cache.load = load_and_count


def child_load(model: Path) -> dict[str, Any]:
    """One process loading `model` (see the module docstring, 6)."""
    began = time.perf_counter()
    from metallic.engine.engine import Engine
    from metallic.engine.sampling import SamplingParams

    start_device()
    parts: dict[str, float] = {}
    load_parts(parts)
    ready = time.perf_counter()
    engine = Engine(model)
    synchronize()
    loaded = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokens = [s.token_id for s in engine.generate_tokens([1, 100, 200, 300], params)]
    return {
        "imports and CUDA init": ready - began,
        "Engine(...)": loaded - ready,
        "parts": parts,
        "staging": engine.staging.stats(),
        "tokens": tokens,
    }


def child(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    _, out, _ = timed_process(command, env)
    return json.loads(out.strip().splitlines()[-1])


# The parent.


def median_of(reps: int, run: Callable[[], float]) -> tuple[float, list[float]]:
    values = [run() for _ in range(reps)]
    return statistics.median(values), values


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass


def measure(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], list[str]]:
    """Every figure, and the checks that failed."""
    env = child_env(scratch / "triton", scratch / "metallic")
    failures = []
    result: dict[str, Any] = {"model": str(args.model), "reps": args.reps}
    bare_command = [sys.executable, "-c", SMOKE_BARE if args.smoke else BARE]
    timed_process(bare_command, env)  # torch's libraries into the page cache
    bare, result["bare runs"] = median_of(args.reps, lambda: timed_process(bare_command, env)[0])
    result["bare"] = bare
    print(f"bare import torch + CUDA init: {bare:.2f} s", flush=True)

    cold, cold_text, cold_err = timed_process(run_command(args.model), env)
    result["cold"], result["cold stderr"] = cold, cold_err
    if NOTICE not in cold_err and not args.smoke:  # the CPU compiles nothing
        failures.append(f"the first run did not say it compiles kernels: {cold_err!r}")
    print(f"metallic run, first run: {cold:.2f} s", flush=True)

    def warm_run() -> float:
        seconds, text, err = timed_process(run_command(args.model), env)
        if text != cold_text:
            failures.append(f"a warm run wrote {text!r}, the first run {cold_text!r}")
        if "compil" in err:
            failures.append(f"a warm run spoke of compiling: {err!r}")
        return seconds

    result["warm"], result["warm runs"] = median_of(args.reps, warm_run)
    result["text"] = cold_text
    print(f"metallic run, warm: {result['warm']:.2f} s; text {cold_text.strip()!r}", flush=True)

    if args.llama_bin is not None:
        name, command = llama_command(args.llama_bin, args.model)
        result["llama.cpp program"] = name
        result["llama.cpp"], result["llama.cpp runs"] = median_of(
            args.reps, lambda: timed_process(command, env)[0]
        )
        print(f"llama.cpp {name}: {result['llama.cpp']:.2f} s", flush=True)

    phases = [sys.executable, __file__, "--child-phases", str(args.model)]
    cold_env = child_env(scratch / "cold-triton", scratch / "cold-metallic")
    result["in process, first run"] = child(phases, cold_env)
    if args.profile:
        phases += ["--profile-to", str(args.out / "startup-profile.txt")]
    result["in process"] = child(phases, env)
    for key in ("in process", "in process, first run"):
        if result[key]["text"] != cold_text.removesuffix("\n"):
            failures.append(f"{key}, generate wrote another text than `metallic run`")

    if not args.skip_8b:
        path = big_model(args.workdir, "tiny-llama" if args.smoke else "llama3-8b")
        warm_page_cache(path)
        loads = [child([sys.executable, __file__, "--child-load", str(path)], env) for _ in "ab"]
        if loads[0]["tokens"] != loads[1]["tokens"]:
            failures.append(f"two loads of the 8B generate {loads[0]['tokens']} and ...[1]")
        result["8B loads"] = loads
        result["load-8b"] = loads[1]["Engine(...)"]
        print(f"8B Engine(...) from the page cache: {result['load-8b']:.2f} s", flush=True)
    return result, failures


def big_model(workdir: Path, preset: str) -> Path:
    from metallic.testing.synthetic import write_synthetic_model

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{preset}-Q4_K_M.gguf"  # the name the other GPU benchmarks use
    if not path.exists():
        write_synthetic_model(path, preset, "Q4_K_M")
    return path


def print_table(result: dict[str, Any]) -> None:
    bare = result["bare"]
    rows = [("bare: python -c 'import torch; torch.cuda.init()'", bare)]
    rows += [("metallic run, first run (empty caches)", result["cold"])]
    rows += [("metallic run, warm caches", result["warm"])]
    if "llama.cpp" in result:
        rows.append((f"llama.cpp {result['llama.cpp program']}", result["llama.cpp"]))
    print(f"\n{'whole process':<52} {'seconds':>8} {'over bare':>10}")
    for label, seconds in rows:
        print(f"{label:<52} {seconds:>8.2f} {seconds - bare:>+10.2f}")
    for key, title in (("in process", "warm caches"), ("in process, first run", "empty caches")):
        inside = result[key]
        print(f"\nin one process, {title} (seconds):")
        for label, seconds in [*inside["phases"].items(), *inside["parts"].items()]:
            print(f"  {label:<40} {seconds:>7.3f}")
        first = inside["first generate"]
        print(f"  first generate: prompt {first['prompt']:.3f}, decode {first['decode']:.3f}")
        triton = dict(inside["triton"])
        slowest = sorted(triton.pop("compiles"), key=lambda c: -c[1])[:8]
        print(f"  triton: {triton}")
        if slowest:
            print("  slowest compiles: " + ", ".join(f"{n} {s:.2f}" for n, s in slowest))
    checks = [
        ("warm <= bare + 2 s", result["warm"] <= bare + 2),
        ("first run <= bare + 15 s", result["cold"] <= bare + 15),
    ]
    if "load-8b" in result:
        second = result["8B loads"][1]
        print(f"\n8B Engine(...) from the page cache: {result['load-8b']:.2f} s")
        print("  parts: " + ", ".join(f"{k} {v:.3f}" for k, v in second["parts"].items()))
        print(f"  staging: {second['staging']}")
        checks.append(("8B load <= 1.5 s", result["load-8b"] <= 1.5))
    print("targets: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Gemma 3 270M Q4_K_M (default: installed)")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp's build/bin")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the warm child")
    parser.add_argument(
        "--smoke", action="store_true", help="check the script on the CPU (tiny model as the 8B)"
    )
    parser.add_argument("--child-phases", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-load", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_phases is not None:
        print(json.dumps(child_phases(args.child_phases, args.profile_to)))
        return 0
    if args.child_load is not None:
        print(json.dumps(child_load(args.child_load)))
        return 0
    import torch
    from common import device_name, out_dir, row, write_record  # imports torch: not in children

    if not (torch.cuda.is_available() or args.smoke):
        print("gpu_startup: needs a CUDA device (--smoke runs on the CPU)", file=sys.stderr)
        return 2
    if args.model is None:
        from metallic.gguf.default_model import default_model_path

        args.model = default_model_path()
    args.out = out_dir()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metallic-startup-") as scratch:
        result, failures = measure(args, Path(scratch))
    result["failures"] = failures
    result["benchmark seconds"] = time.perf_counter() - began
    print_table(result)
    (args.out / "gpu_startup.json").write_text(json.dumps(result, indent=1, default=str))
    model = "gemma"
    records = [
        row(model, "startup-bare", "floor", result["bare"], "s"),
        row(model, "startup-cold", "metallic", result["cold"], "s"),
        row(model, "startup-warm", "metallic", result["warm"], "s"),
    ]
    if "llama.cpp" in result:
        records.append(row(model, "startup-warm", "llama.cpp", result["llama.cpp"], "s"))
    if "load-8b" in result:
        records.append(row("llama3-8b", "load-8b", "metallic", result["load-8b"], "s"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("record:", write_record("startup", device_name(device), records))
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
