"""Hostile model files through the whole load, many more than CI runs: how does each end?

Runs the cases of `metallic.testing.hostile` (tests/engine/test_load_fuzz.py runs the first
1,000): tiny llama / qwen2 / qwen3 / gemma3 models with hostile metadata values, per-layer and
tokenizer arrays of the wrong length or swapped, or flipped header bytes, each loaded on the CPU
and asked for two tokens within 10 s of CPU time. Counts the outcomes (a clean run, a one-line
MetallicError, another exception, a hang, memory growth past 256 MiB) per kind of case, prints
them as a table with the failing cases, and writes JSON to $OUT or benchmarks/results/. Exits 1
when any case ended in anything but a clean run or a one-line error.

    python benchmarks/fuzz_load.py [--cases 10000] [--first-seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from metallic.testing.hostile import CASE_KINDS, OUTCOMES, HostileModels, run_cases

MAX_LISTED = 50  # failing cases printed and written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    counts = {kind: Counter[str]() for kind in CASE_KINDS}
    failures = []
    seeds = range(args.first_seed, args.first_seed + args.cases)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for case, outcome in run_cases(HostileModels(Path(workdir)), seeds):
            counts[case.kind][outcome.kind] += 1
            if outcome.kind not in ("ran", "error"):
                failures.append(
                    {
                        "seed": case.seed,
                        "family": case.family,
                        "case": case.description,
                        "outcome": outcome.kind,
                        "detail": outcome.detail,
                    }
                )
                print(json.dumps(failures[-1]), flush=True)
    seconds = time.perf_counter() - began
    total = sum(counts.values(), Counter[str]())

    print(f"\n{args.cases} cases (seeds {seeds.start}..{seeds.stop - 1}) in {seconds:.0f} s")
    print(f"{'case kind':<12}" + "".join(f"{o:>9}" for o in OUTCOMES) + f"{'total':>9}")
    for label, row in [*counts.items(), ("all", total)]:
        cells = "".join(f"{row[o]:>9}" for o in OUTCOMES)
        print(f"{label:<12}{cells}{sum(row.values()):>9}")
    for failure in failures[:MAX_LISTED]:
        print(f"seed {failure['seed']} {failure['family']}: {failure['case']} -> "
              f"{failure['outcome']}: {failure['detail']}")  # fmt: skip

    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "cases": args.cases,
        "first_seed": args.first_seed,
        "seconds": seconds,
        "outcomes": {o: total[o] for o in OUTCOMES},
        "by_kind": {kind: {o: row[o] for o in OUTCOMES} for kind, row in counts.items()},
        "failures": failures[:MAX_LISTED],
    }
    (out / "fuzz_load.json").write_text(json.dumps(result, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
