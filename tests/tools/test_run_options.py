"""`metallic run --profile / --trace / --stats`: the tables, the trace file, memory per kind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from metallic.cli import _memory_kinds
from metallic.runtime.memory import KINDS, MemoryPool
from metallic.testing.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "qwen3.gguf", "tiny-qwen3")


def test_run_profile_trace_and_stats(cli, model: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    code, out, err = cli(
        "run", str(model), "-p", "hello there", "-n", "5", "--temp", "0", "--ignore-eos",
        "--device", "cpu", "--profile", "--trace", str(trace), "--stats",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip()  # the generated text still goes to stdout, alone
    assert "| op | ms/step" not in out
    assert re.search(r"^prefill: 1 steps, \d+ tokens a step", err, re.MULTILINE)
    assert re.search(r"^decode: [45] steps, 1 tokens a step", err, re.MULTILINE)
    for layer in range(3):  # tiny-qwen3's layers, in both phases' per-layer tables
        assert len(re.findall(rf"^\| {layer} \| [\d.]+ \| ", err, re.MULTILINE)) == 2
    assert re.search(r"^process peak memory \d+ MiB \(resident\)$", err, re.MULTILINE)
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"layer 0", "layer 1", "layer 2", "qkv", "attention", "output"} <= names


def test_unwritable_trace_fails_before_loading(cli, tmp_path: Path) -> None:
    code, out, err = cli("run", str(tmp_path / "no-model.gguf"), "-p", "hi", "--trace", "/")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("metallic: error: --trace /: cannot write")


def test_memory_kinds_line() -> None:
    """Current / peak / time-averaged MiB per kind of the pool's own figures."""
    pool = MemoryPool(torch.device("cpu"), arena_bytes=1 << 20)
    pool.allocate("weights", 1 << 20, torch.uint8)
    kv = pool.allocate("kv", 1 << 19, torch.float32)
    pool.free(kv)
    line = _memory_kinds({"memory_pool": pool.stats()})
    assert line.startswith("memory pool MiB (current/peak/average): ")
    figures = dict(part.split(" ") for part in line.split(": ", 1)[1].split(", "))
    assert set(figures) == set(KINDS)
    current, peak, average = (float(x) for x in figures["weights"].split("/"))
    assert current == peak == 1.0 and 0 < average <= 1.0
    current, peak, _ = (float(x) for x in figures["kv"].split("/"))
    assert current == 0.0 and peak == 2.0
