"""What the benchmarks share: where results go, the record format, baselines run beside metallic.

A record is the JSON that a GPU run commits under benchmarks/records/:
`{"device", "date", "commit", "command", "rows": [{"model", "test", "engine", "value", "unit"}]}`
with models `gemma3-270m-q4_k_m` and `llama3-8b-q4_k_m`, tests `pp512`, `tg128`, `batch-B`,
`ttft-p50`, ... and engines `metallic`, `llama.cpp`, `floor`, `hf`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from metallic.testing.synthetic import write_synthetic_model

HERE = Path(__file__).resolve().parent
# Record names of the models the project benchmarks (by the label a script gives them).
MODEL_NAMES = {"gemma": "gemma3-270m-q4_k_m", "llama3-8b": "llama3-8b-q4_k_m"}


def out_dir() -> Path:
    """$OUT on the device machine (its files come back), else benchmarks/results/."""
    out = Path(os.environ.get("OUT") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def synthetic_model(workdir: Path, preset: str, vocab: Path | None = None) -> Path:
    """The preset's Q4_K_M file (`metallic.testing`) in `workdir`, written unless there. A file
    with llama.cpp's vocabulary (`vocab`, which llama.cpp needs to load it) carries its name, so
    scripts with and without one never take each other's file."""
    suffix = f"-{vocab.stem}" if vocab else ""
    path = workdir / f"{preset}-Q4_K_M{suffix}.gguf"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        write_synthetic_model(path, preset, "Q4_K_M", vocab=vocab)
    return path


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    import triton

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * (1 << 30) / (ms * 1e-3)


def row(model: str, test: str, engine: str, value: float, unit: str) -> dict[str, object]:
    return {
        "model": MODEL_NAMES.get(model, model),
        "test": test,
        "engine": engine,
        "value": round(value, 3),
        "unit": unit,
    }


def write_record(name: str, device: str, rows: list[dict[str, object]]) -> Path:
    """The run's record (see the module docstring) as `name-DATE.json` in the results folder."""
    # $METALLIC_COMMIT first: a copy of the tree on another machine may carry an older .git.
    commit = os.environ.get("METALLIC_COMMIT", "")
    with contextlib.suppress(OSError):
        commit = (
            commit
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
            ).stdout.strip()
        )
    date = datetime.date.today().isoformat()
    record = {
        "device": device,
        "date": date,
        "commit": commit or "unknown",
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "rows": rows,
    }
    path = out_dir() / f"{name}-{date}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def llama_batched_bench(
    binary: Path, model: Path, prompt: int, generated: int, batches: list[int]
) -> dict[int, dict[str, float]]:
    """llama.cpp's own batched benchmark on the same file, all layers on the GPU, flash
    attention: per batch size its columns (S_PP t/s, S_TG t/s, ...) as printed."""
    context = max(batches) * (prompt + generated) + 256
    command = [
        str(binary), "-m", str(model), "-ngl", "99", "-fa", "1", "-c", str(context),
        "-npp", str(prompt), "-ntg", str(generated), "-npl", ",".join(map(str, batches)),
    ]  # fmt: skip
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return {int(r["B"]): r for r in _markdown_rows(text)}


def llama_bench(binary: Path, model: Path, prompt: int, generated: int) -> dict[str, float]:
    """llama-bench's pp and tg figures (tokens/s) on the same file."""
    command = [
        str(binary), "-m", str(model), "-ngl", "99", "-fa", "1",
        "-p", str(prompt), "-n", str(generated), "-o", "json",
    ]  # fmt: skip
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    out = {}
    for test in json.loads(text):
        name = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        out[name] = float(test["avg_ts"])
    return out


def _markdown_rows(text: str) -> list[dict[str, float]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells and re.fullmatch(r"[\d.]+", cells[0]):
            rows.append(dict(zip(header, map(float, cells), strict=True)))
    return rows
