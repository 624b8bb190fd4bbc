"""Memory system on the GPU: staging-ring upload bandwidth, and what loading a model costs.

1. Upload bandwidth of `StagingRing` from pageable host memory (what the memory map is),
   beside a plain `copy_` from pinned memory of the same bytes (the issue's baseline) and a
   pageable `copy_`.
2. Loading a model (default: the synthetic Llama-3-8B Q4_K_M): the process's anonymous resident
   memory (RssAnon; mapped file pages don't count) before and after, load time, and time from
   the start to the first generated token.

Prints a table and writes JSON to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from metallic.runtime.staging import StagingRing
from metallic.testing.synthetic import write_synthetic_model


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gb_per_s(nbytes: int, fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return nbytes / best / 1e9


def upload_bandwidth(nbytes: int = 1 << 30) -> dict[str, float]:
    pageable = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    pinned = pageable.pin_memory()
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ring = StagingRing(torch.device("cuda"))
    result = {
        "pinned_copy_gb_s": gb_per_s(nbytes, lambda: device.copy_(pinned, non_blocking=True)),
        "pageable_copy_gb_s": gb_per_s(nbytes, lambda: device.copy_(pageable)),
        "staging_ring_gb_s": gb_per_s(nbytes, lambda: ring.upload(pageable, device)),
    }
    result["staging_vs_pinned"] = result["staging_ring_gb_s"] / result["pinned_copy_gb_s"]
    return result


def load_costs(path: Path) -> dict[str, float]:
    from metallic.engine.engine import Engine

    path.read_bytes()  # the file in the page cache: measure loading, not the disk
    before = rss_anon_mib()
    began = time.perf_counter()
    engine = Engine(path, device="cuda", context_size=4096)
    torch.cuda.synchronize()
    loaded = time.perf_counter()
    after_load = rss_anon_mib()
    next(iter(engine.stream(list(range(100, 116)), max_tokens=1, temperature=0)), None)
    first_token = time.perf_counter()
    return {
        "rss_anon_before_mib": before,
        "rss_anon_after_load_mib": after_load,
        "rss_anon_growth_mib": after_load - before,
        "rss_anon_after_first_token_mib": rss_anon_mib(),
        "load_s": loaded - began,
        "start_to_first_token_s": first_token - began,
        "staging": engine.staging.stats(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="default: a synthetic Llama-3-8B Q4_K_M")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_memory: needs a CUDA device", file=sys.stderr)
        return 2
    torch.cuda.init()
    path = args.model
    if path is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        path = args.workdir / "llama3-8b-Q4_K_M.gguf"
        if not path.exists():
            write_synthetic_model(path, "llama3-8b", "Q4_K_M")
    load = load_costs(path)  # first, before the bandwidth test pins a GiB
    bandwidth = upload_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"\n{device}")
    print(
        f"upload 1 GiB: staging ring {bandwidth['staging_ring_gb_s']:.1f} GB/s, pinned copy_ "
        f"{bandwidth['pinned_copy_gb_s']:.1f} GB/s ({100 * bandwidth['staging_vs_pinned']:.0f}%),"
        f" pageable copy_ {bandwidth['pageable_copy_gb_s']:.1f} GB/s"
    )
    print(
        f"load {path.name}: RssAnon {load['rss_anon_before_mib']:.0f} -> "
        f"{load['rss_anon_after_load_mib']:.0f} MiB (+{load['rss_anon_growth_mib']:.0f}), "
        f"load {load['load_s']:.1f} s, start to first token {load['start_to_first_token_s']:.1f} s"
    )
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "model": path.name, "upload": bandwidth, "load": load}
    (out / "gpu_memory.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
