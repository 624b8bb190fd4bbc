"""Hostile metadata through the whole load: a clean run or a one-line error, nothing else.

1,000 seeded cases over tiny llama / qwen2 / qwen3 / gemma3 models (`metallic.testing.hostile`):
hostile scalar values, per-layer arrays of the wrong length or with a hostile entry, tokenizer
arrays truncated or swapped, flipped header bytes. Each is loaded on the CPU and asked for two
tokens under a time limit. Anything but a clean run or a one-line `MetallicError` fails the test:
another exception, a hang (10 s of CPU time) or a case that raises peak memory by more than
256 MiB.
`benchmarks/fuzz_load.py` runs the same cases, 10,000 of them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from metallic.testing.hostile import HostileModels, run_cases

N_CASES = 1000


def test_hostile_models_load_cleanly_or_fail_in_one_line(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    failures = []
    for case, outcome in run_cases(HostileModels(tmp_path), range(N_CASES)):
        counts[outcome.kind] += 1
        if outcome.kind not in ("ran", "error"):
            failures.append(f"seed {case.seed} ({case.family}: {case.description}): {outcome}")
    assert not failures, "\n".join(failures[:20])
    # both outcomes must be common, or the cases test nothing (or only the first check)
    assert counts["ran"] > N_CASES // 10 and counts["error"] > N_CASES // 2, counts
    print(f"{N_CASES} hostile models: {dict(counts)}")
