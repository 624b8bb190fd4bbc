"""Does `--gpu-memory 2G` hold the whole process under 2 GiB, as nvidia-smi sees it?

For the synthetic Llama-3-8B Q4_K_M (written on the GPU machine), this process loads the model
under `memory_budget` (default 2G), runs a 128-token prompt and generates 32 greedy tokens, while
a thread samples the process's device memory every 50 ms (NVML through pynvml where installed,
else `nvidia-smi --query-compute-apps`). Checks first that the greedy tokens equal those of an
all-on-device run (in a child process, so this process holds nothing else), then reports the
peak process memory against the budget per phase (load, prefill, decode), beside torch's own
peaks, the plan's split and the memory outside torch's allocator (start-up share, and its growth
afterwards against the allowance `runtime.budget.KERNEL_MODULE_BYTES`). Prints a table and writes
JSON to $OUT or benchmarks/results/; exits 1 when the tokens differ or the peak passes the budget.

    python benchmarks/gpu_budget.py [--budget 2G] [--preset llama3-8b] [--mix Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.runtime.budget import KERNEL_MODULE_BYTES, held_outside_torch
from metallic.runtime.placement import MiB, parse_bytes
from metallic.testing.synthetic import write_synthetic_model

PROMPT_TOKENS, GENERATED = 128, 32
SAMPLE_SECONDS = 0.05


def prompt_ids() -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, 100_000, (PROMPT_TOKENS,), generator=gen).tolist()


def greedy(engine: Engine) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=GENERATED, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(prompt_ids(), params)]


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
                "t": time.perf_counter(),
                "phase": self.phase,
                "process": self.memory.used(),
                "device": self.memory.device_used(),
                "torch_reserved": reserved,
            }
        )


def reference_tokens(path: Path) -> list[int]:
    """All layers on the device, in a child process (its memory is gone when it exits)."""
    command = [sys.executable, __file__, "--reference", str(path)]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"the all-on-device reference run failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def peak(samples: list[dict], key: str, phase: str | None = None) -> int:
    values = [s[key] for s in samples if s[key] is not None and phase in (None, s["phase"])]
    return max(values, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="2G")
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--mix", default="Q4_K_M")
    parser.add_argument("--nvml-index", type=int, default=0, help="NVML's index of the GPU")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference is not None:  # the child: all on device, tokens as JSON
        print(json.dumps(greedy(Engine(args.reference, context_size=4096))))
        return 0
    if not torch.cuda.is_available():
        print("gpu_budget: needs a CUDA device", file=sys.stderr)
        return 2
    budget = parse_bytes(args.budget)
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"{args.preset}-{args.mix}.gguf"
    if not path.exists():
        write_synthetic_model(path, args.preset, args.mix)
    reference = reference_tokens(path)

    memory = ProcessMemory(args.nvml_index)
    device_before = memory.device_used()  # before this process has a CUDA context
    sampler = Sampler(memory)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    began = time.perf_counter()
    sampler.phase = "load"
    outside_at_start = held_outside_torch(torch.device("cuda"))  # what the engine measures
    engine = Engine(path, context_size=4096, memory_budget=budget)
    load_s = time.perf_counter() - began
    sampler.phase = "prefill+decode"
    tokens = greedy(engine)
    torch.cuda.synchronize()
    sampler.phase = "end"
    sampler.stop.set()
    thread.join()

    samples = sampler.samples
    plan = engine.plan
    assert plan is not None
    outside = [s["process"] - s["torch_reserved"] for s in samples if s["process"] is not None]
    process_peak = peak(samples, "process")
    device_peak = peak(samples, "device")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "model": f"{args.preset} {args.mix}",
        "budget": budget,
        "source": memory.source,
        "greedy_equal": tokens == reference,
        "process_peak": process_peak,
        "process_peak_by_phase": {
            phase: peak(samples, "process", phase) for phase in ("load", "prefill+decode", "end")
        },
        "device_growth_peak": device_peak - device_before if device_before is not None else None,
        "torch_allocated_peak": torch.cuda.max_memory_allocated(),
        "torch_reserved_peak": torch.cuda.max_memory_reserved(),
        "outside_torch_at_start": outside_at_start,
        "outside_torch_peak": max(outside, default=0),
        "outside_torch_growth": max(outside, default=0) - outside_at_start,
        "kernel_module_allowance": KERNEL_MODULE_BYTES,
        "plan": {
            "weights": plan.weight_bytes,
            "kv_cache": plan.kv_bytes,
            "reserve": plan.reserve_bytes,
            "layers_streamed": len(plan.host_layers),
        },
        "load_s": load_s,
        "samples": len(samples),
        "tokens": tokens,
    }
    within = process_peak <= budget

    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / MiB:.0f}"

    print(f"\n{result['gpu']}, {result['model']}, --gpu-memory {args.budget} ({mib(budget)} MiB)")
    print(f"greedy tokens equal to all-on-device: {result['greedy_equal']}")
    print(f"{'what':<44}{'MiB':>8}")
    rows = [
        (f"process peak ({memory.source}, {len(samples)} samples)", process_peak),
        *((f"  during {phase}", value) for phase, value in result["process_peak_by_phase"].items()),
        ("device-wide growth peak (NVML)", result["device_growth_peak"]),
        ("torch allocated peak", result["torch_allocated_peak"]),
        ("torch reserved peak", result["torch_reserved_peak"]),
        ("outside torch at start-up (measured)", outside_at_start),
        ("outside torch peak", result["outside_torch_peak"]),
        ("  growth after start-up (allowance below)", result["outside_torch_growth"]),
        ("kernel module allowance", KERNEL_MODULE_BYTES),
        (f"plan: weights ({len(plan.host_layers)} layers streamed)", plan.weight_bytes),
        ("plan: KV cache", plan.kv_bytes),
        ("plan: reserve (activations, runtime, context)", plan.reserve_bytes),
    ]
    for label, value in rows:
        print(f"{label:<44}{mib(value):>8}")
    print(f"peak within the budget: {within}")
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_budget.json").write_text(json.dumps(result, indent=1))
    return 0 if within and result["greedy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
