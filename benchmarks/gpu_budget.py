"""Does `--gpu-memory 2G` hold the whole process under 2 GiB, as nvidia-smi sees it?

For the synthetic Llama-3-8B Q4_K_M (written on the GPU machine), one child process per run (a
fresh CUDA context each): first all on the device, then one per budget (default 512M, 1536M,
2G, 3G). Each loads the model, runs a 128-token prompt and 32 greedy tokens while a thread
samples the process's device memory in NVML every 2 ms (through pynvml; nvidia-smi, slower,
where it is missing) beside torch's reserved bytes. A budget below the model's minimum must be
refused with the one-line error; one that runs must give the greedy tokens of the all-on-device
run and peak within the budget. Prints a table (budget, NVML peak, torch's peaks, the memory
outside torch, placement, decode tok/s, the plan's split) and writes the details as JSON and a
record (`benchmarks/common.py`) to $OUT or benchmarks/results/. Exits 1 when a run's tokens
differ or its peak passes its budget, or when 2G does not run.

    python benchmarks/gpu_budget.py [--budget 2G ...] [--preset llama3-8b] [--mix Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import out_dir, row, write_record

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.errors import MetallicError
from metallic.runtime.budget import KERNEL_MODULE_BYTES, held_outside_torch
from metallic.runtime.placement import parse_bytes
from metallic.testing.synthetic import write_synthetic_model

PROMPT_TOKENS, GENERATED = 128, 32
SAMPLE_SECONDS = 0.002
MiB = 1 << 20


class ProcessMemory:
    """This process's device memory, as NVML (or nvidia-smi) reports it for its pid."""

    def __init__(self, nvml_index: int) -> None:
        self.pid = os.getpid()
        try:
            import pynvml  # nvidia-ml-py: on the GPU machine, not a metallic dependency

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            self.source = "NVML"
        except ImportError:
            self.nvml = None
            self.source = "nvidia-smi"

    def device_used(self) -> int | None:
        """The whole device's used bytes (NVML only): its growth is this process's where the
        device is not shared, a cross-check for the per-process figure."""
        if self.nvml is None:
            return None
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def used(self) -> int | None:
        """Bytes the device holds for this process, or None before it has a context."""
        if self.nvml is not None:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == self.pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
            return None
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv"]
        for line in subprocess.run(query, capture_output=True, text=True).stdout.splitlines()[1:]:
            pid, used = (part.strip() for part in line.split(","))
            if int(pid) == self.pid:
                return int(used.split()[0]) * MiB  # "1234 MiB"
        return None


@dataclass
class Sampler:
    """Samples process memory, device memory and torch's reserved bytes in a thread, each
    sample tagged with the phase the main thread is in."""

    memory: ProcessMemory
    phase: str = "start"
    samples: list[dict] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(SAMPLE_SECONDS)
        self.sample()

    def sample(self) -> None:
        reserved = torch.cuda.memory_reserved() if torch.cuda.is_initialized() else 0
        self.samples.append(
            {
                "phase": self.phase,
                "process": self.memory.used(),
                "device": self.memory.device_used(),
                "torch_reserved": reserved,
            }
        )


def peak(samples: list[dict], key: str, phase: str | None = None) -> int:
    values = [s[key] for s in samples if s[key] is not None and phase in (None, s["phase"])]
    return max(values, default=0)


def child(path: Path, budget: str | None, nvml_index: int) -> dict:
    """One run in this process: load under `budget` (None: all on the device), prompt and
    greedy tokens, NVML sampled throughout."""
    memory = ProcessMemory(nvml_index)
    device_before = memory.device_used()  # before this process has a CUDA context
    sampler = Sampler(memory)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    result: dict = {"gpu": torch.cuda.get_device_name(), "budget": budget, "source": memory.source}
    sampler.phase = "load"
    began = time.perf_counter()
    outside_at_start = held_outside_torch(torch.device("cuda"))  # what the engine measures
    try:
        engine = Engine(path, context_size=4096, memory_budget=budget)
    except MetallicError as err:
        sampler.stop.set()
        thread.join()
        return result | {"refused": str(err), "outside_at_start": outside_at_start}
    result["load_s"] = time.perf_counter() - began
    sampler.phase = "prefill+decode"
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 100_000, (PROMPT_TOKENS,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=GENERATED, ignore_eos=True)
    tokens, arrived = [], []
    began = time.perf_counter()
    try:
        for step in engine.generate_tokens(prompt, params):
            tokens.append(step.token_id)
            arrived.append(time.perf_counter())
    except MetallicError as err:  # e.g. a step the budget could not hold
        result["failed"] = str(err)
    torch.cuda.synchronize()
    sampler.phase = "end"
    sampler.stop.set()
    thread.join()
    if "failed" in result:
        return result | {"nvml_peak": peak(sampler.samples, "process")}

    samples = sampler.samples
    outside = [s["process"] - s["torch_reserved"] for s in samples if s["process"] is not None]
    plan = engine.plan
    result |= {
        "tokens": tokens,
        "prefill_s": arrived[0] - began,
        # From the second decode step on: the first captures its graph.
        "decode_tok_s": (len(arrived) - 2) / (arrived[-1] - arrived[1]),
        "nvml_peak": peak(samples, "process"),
        "nvml_peak_by_phase": {
            phase: peak(samples, "process", phase) for phase in ("load", "prefill+decode", "end")
        },
        "device_growth_peak": (
            peak(samples, "device") - device_before if device_before is not None else None
        ),
        "samples": len(samples),
        "torch_reserved_peak": torch.cuda.max_memory_reserved(),
        "torch_allocated_peak": torch.cuda.max_memory_allocated(),
        "outside_at_start": outside_at_start,
        "outside_peak": max(outside, default=0),
        "kernel_module_allowance": KERNEL_MODULE_BYTES,
        "placement": engine.stats()["placement"],
        "max_num_seqs": engine.scheduler.max_num_seqs,
    }
    if plan is not None:
        result["plan"] = {
            "describe": plan.describe(),
            "weights": dict(plan.weight_parts()),
            "kv_cache": plan.kv_bytes,
            "reserve": dict(plan.reserve),
            "host_embedding": plan.host_fixed_bytes,
        }
    return result


def run_child(path: Path, budget: str | None, nvml_index: int) -> dict:
    command = [sys.executable, __file__, "--child", str(path), "--nvml-index", str(nvml_index)]
    command += ["--child-budget", budget] if budget else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the run under {budget or 'no budget'} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", action="append", default=[], help="repeatable (default 512M 1536M 2G 3G)"
    )
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--mix", default="Q4_K_M")
    parser.add_argument("--nvml-index", type=int, default=0, help="NVML's index of the GPU")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one run; its result as the last line of JSON
        print(json.dumps(child(args.child, args.child_budget, args.nvml_index)))
        return 0
    # This process never starts CUDA: each child has the device to itself.
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"{args.preset}-{args.mix}.gguf"
    if not path.exists():
        write_synthetic_model(path, args.preset, args.mix)
    reference = run_child(path, None, args.nvml_index)
    if "tokens" not in reference:
        raise SystemExit(f"the all-on-device run did not run: {reference}")
    runs = {}
    for budget in args.budget or ["512M", "1536M", "2G", "3G"]:
        runs[budget] = run_child(path, budget, args.nvml_index)

    failures = []
    print(f"\n{reference['gpu']}, {args.preset} {args.mix}, {reference['source']} every ~2 ms")
    head = ("budget", "NVML peak", "torch res.", "torch alloc.", "outside", "layers", "seqs")
    print("".join(f"{h:>13}" for h in head) + f"{'tok/s':>8}{'greedy=':>9}")
    for label, r in [("none", reference), *runs.items()]:
        if "refused" in r or "failed" in r:
            outcome, message = (
                ("refused", r["refused"]) if "refused" in r else ("FAILED", r["failed"])
            )
            if outcome == "FAILED":
                failures.append(f"{label}: {message}")
            print(f"{label:>13}  {outcome}: {message}")
            continue
        place = r["placement"]
        layers = (
            f"{place['layers_on_device']}/{place['layers_on_device'] + place['layers_streamed']}"
        )
        equal = r["tokens"] == reference["tokens"]
        cells = (
            label, mib(r["nvml_peak"]), mib(r["torch_reserved_peak"]),
            mib(r["torch_allocated_peak"]), mib(r["outside_peak"]), layers, r["max_num_seqs"],
        )  # fmt: skip
        print("".join(f"{c:>13}" for c in cells) + f"{r['decode_tok_s']:>8.1f}{equal!s:>9}")
        if label != "none":
            budget = parse_bytes(label)
            if not equal:
                failures.append(f"{label}: greedy tokens differ from the all-on-device run")
            if r["nvml_peak"] > budget:
                failures.append(f"{label}: NVML peak {mib(r['nvml_peak'])} MiB passes the budget")
    for label, r in runs.items():
        if "plan" in r:
            print(f"plan at {label}: {r['plan']['describe']}")
    if "refused" in runs.get("2G", {}):
        failures.append("2G was refused")

    peak_mib = reference["nvml_peak"] / MiB
    rows = [
        row(args.preset, "all-on-device-process-peak-nvml", "metallic", peak_mib, "MiB"),
        row(args.preset, "all-on-device-decode", "metallic", reference["decode_tok_s"], "tok/s"),
    ]
    for label, r in runs.items():
        test = f"gpu-memory-{label}"
        if "refused" in r:  # the minimum it names, or what the context alone holds
            for pattern, what in (
                (r"needs at least (\d+) MiB", "refused-minimum"),
                (r"alone hold (\d+) MiB", "refused-context-and-libraries"),
            ):
                if found := re.search(pattern, r["refused"]):
                    value = float(found.group(1))
                    rows.append(row(args.preset, f"{test}-{what}", "metallic", value, "MiB"))
            continue
        if "failed" in r:
            continue
        for what, value in (
            ("process-peak-nvml", r["nvml_peak"]),
            ("budget", parse_bytes(label)),
            ("torch-reserved-peak", r["torch_reserved_peak"]),
            ("torch-allocated-peak", r["torch_allocated_peak"]),
            ("outside-torch-at-start", r["outside_at_start"]),
            ("outside-torch-peak", r["outside_peak"]),
        ):
            rows.append(row(args.preset, f"{test}-{what}", "metallic", value / MiB, "MiB"))
        rows.append(row(args.preset, f"{test}-decode", "metallic", r["decode_tok_s"], "tok/s"))
    (out_dir() / "gpu_budget.json").write_text(
        json.dumps({"reference": reference, "runs": runs, "failures": failures}, indent=1)
    )
    print(f"record: {write_record('budget', reference['gpu'], rows)}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
