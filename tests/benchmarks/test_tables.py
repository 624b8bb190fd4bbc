"""benchmarks/tables.py: BENCHMARKS.md's tables from a sample record and bench document."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tables.py"
spec = importlib.util.spec_from_file_location("tables", SCRIPT)
assert spec is not None and spec.loader is not None
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


def rate(model: str, test: str, engine: str, value: float) -> dict[str, object]:
    return {"model": model, "test": test, "engine": engine, "value": value, "unit": "tok/s"}


GEMMA, LLAMA = "gemma3-270m-q4_k_m", "llama3-8b-q4_k_m"
RECORD = {
    "device": "NVIDIA H200",
    "date": "2026-12-05",
    "commit": "abc1234",
    "command": "python benchmarks/gpu_bench.py --model gemma.gguf --synthetic llama3-8b",
    "rows": [
        rate(GEMMA, "pp512", "metallic", 246998.4),
        rate(GEMMA, "tg128", "metallic", 1145.2),
        rate(GEMMA, "batch-8", "metallic", 3119.0),
        rate(GEMMA, "pp512", "llama.cpp", 50284.0),
        rate(GEMMA, "tg128", "llama.cpp", 980.0),
        rate(GEMMA, "batch-8", "llama.cpp", 4762.0),
        rate(GEMMA, "tg128", "floor", 17100.0),
        rate(LLAMA, "tg128", "metallic", 287.1),
        rate(LLAMA, "tg128", "floor", 907.1),
    ],
}
DOC = {  # the parts of a `metallic bench --json` document that the tables read
    "model": {"name": LLAMA},
    "results": [{"test": "tg128", "avg_ts": 287.1, "stddev_ts": 1.26}],
    "profile": {
        "limits": {
            "copy_bandwidth": 4.188e12,
            "matmul_dtype": "bfloat16",
            "matmul_flops": 7.82e14,
        },
        "clock": "cuda events",
        "phases": {
            "decode": {
                "steps": 128,
                "step_ms": 3.5,
                "stamps_per_forward": 164,
                "ops": [
                    {"op": "gate_up+activation", "ms": 1.2, "share": 0.343, "gb_s": 1713.4,
                     "limit_fraction": 0.409, "bound": "memory"},
                    {"op": "attention", "ms": 0.3, "share": 0.0857, "gb_s": 25.0,
                     "limit_fraction": 0.006, "bound": "memory"},
                    {"op": "between forwards", "ms": 2.0, "share": 0.571},
                ],
            }
        },
    },
}  # fmt: skip


def test_comparison_table_sets_engines_side_by_side() -> None:
    lines = tables.comparison_table(RECORD, [DOC]).splitlines()
    assert lines[0] == "| model | test | metallic | llama.cpp | metallic / llama.cpp | floor |"
    assert lines[2:] == [
        "| Gemma 3 270M Q4_K_M | pp512 | 246,998 | 50,284 | 4.91 | – |",
        "| Gemma 3 270M Q4_K_M | tg128 | 1,145 | 980 | 1.17 | 17,100 |",
        "| Gemma 3 270M Q4_K_M | batch-8 | 3,119 | 4,762 | 0.65 | – |",
        "| Llama-3-8B Q4_K_M (synthetic) | tg128 | 287 ± 1.3 | – | – | 907 |",
    ]


def test_profile_table_gives_ops_and_their_limit() -> None:
    lines = tables.profile_table(DOC).splitlines()
    assert lines[0].startswith("Llama-3-8B Q4_K_M (synthetic), decode: 3.500 ms a step over 128")
    assert "cuda events (164 a forward)" in lines[0] and "copy 4,188 GB/s" in lines[0]
    assert lines[4:] == [
        "| gate_up+activation | 1.200 | 34% | 1,713 | 41% (memory) |",
        "| attention | 0.300 | 9% | 25.0 | 1% (memory) |",
        "| between forwards | 2.000 | 57% |  |  |",
    ]


def test_main_prints_the_source_and_every_table(tmp_path: Path, capsys) -> None:
    record, doc = tmp_path / "bench-2026-12-05.json", tmp_path / "bench-llama.json"
    record.write_text(json.dumps(RECORD))
    doc.write_text(json.dumps(DOC))
    assert tables.main([str(record), str(doc)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Device: NVIDIA H200, 2026-12-05, code at `abc1234`. Command: `python")
    assert "(record: `benchmarks/records/bench-2026-12-05.json`)" in out
    assert out.count("| model | test |") == 1 and out.count("| op | ms / step |") == 1


def test_main_refuses_what_is_not_a_record(tmp_path: Path, capsys) -> None:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(DOC))
    with pytest.raises(SystemExit) as exit_:
        tables.main([str(path)])
    assert exit_.value.code == 2
    assert "is not a record: no rows" in capsys.readouterr().err
