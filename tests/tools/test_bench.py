"""`metallic bench`: its JSON against the documented schema, the record, the table, the plot,
and one-line errors for bad arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from metallic.engine.engine import Engine
from metallic.runtime import calibration
from metallic.testing.synthetic import write_synthetic_model
from metallic.tools import bench as bench_tool
from metallic.tools.bench import SCHEMA, EventTimer, HostTimer, Settings, run_tests, timer_for

TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
    "null": type(None),
}


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The places where `value` breaks `schema` (the JSON Schema keywords SCHEMA uses)."""
    errors = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        numeric = any(n in ("integer", "number") for n in names)
        if not any(isinstance(value, TYPES[n]) for n in names) or (
            isinstance(value, bool) and numeric
        ):
            return [f"{where}: {value!r} is not {'/'.join(names)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{where}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        errors += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{where}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{where}[{i}]")
    return errors


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "llama.gguf", "tiny-llama")


@pytest.fixture(scope="module")
def bench(cli, model: Path, tmp_path_factory) -> dict[str, Any]:
    """One bench run writing every output (the plot where matplotlib is installed), on a
    calibrated device."""
    folder = tmp_path_factory.mktemp("bench")
    cpu = torch.device("cpu")
    limits = calibration.measure(cpu, torch.float32, copy_bytes=4 << 20, matmul_size=128)
    calibration.save(limits, folder)
    args = [
        "bench", str(model), "--device", "cpu", "-p", "16,32", "-n", "6", "-b", "1,3",
        "--batch-prompt", "8", "-r", "2", "--profile", "--name", "tiny-llama-q8_0",
        "--json", str(folder / "bench.json"), "--record", str(folder / "record.json"),
    ]  # fmt: skip
    if PLOTS:
        args += ["--plot", str(folder / "bench.png")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METALLIC_CACHE", str(folder))
        code, out, err = cli(*args)
    assert code == 0, err
    return {"stdout": out, "stderr": err, "folder": folder}


try:
    import matplotlib.image

    PLOTS = True
except ImportError:
    PLOTS = False

TESTS = ["pp16", "pp32", "tg6", "batch-1", "batch-3"]


def test_json_follows_its_schema(bench) -> None:
    doc = json.loads((bench["folder"] / "bench.json").read_text())
    assert schema_errors(doc, SCHEMA) == []
    assert [r["test"] for r in doc["results"]] == TESTS
    for r in doc["results"]:
        assert len(r["samples_ts"]) == 2 and r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 2)
        tokens = {"pp": r["prompt"], "tg": r["generate"]}.get(r["kind"])
        if tokens is not None:  # a single sequence: tokens / seconds
            for ts, s in zip(r["samples_ts"], r["samples_s"], strict=True):
                assert ts == pytest.approx(tokens / s)
    assert doc["device"] == doc["device"] | {"type": "cpu", "kernels": False}
    assert doc["model"]["name"] == "tiny-llama-q8_0" and doc["model"]["file_type"] == "Q8_0"
    assert doc["settings"]["batch"] == [1, 3] and doc["settings"]["repetitions"] == 2
    decode = doc["profile"]["phases"]["decode"]
    assert 6 <= decode["steps"] <= 7  # tg6's, and one queued before its end was known
    assert all(row["limit_fraction"] > 0 for row in decode["ops"] if "bound" in row)
    batched = doc["profile"]["phases"]["decode-b3"]  # -b 3's decode steps: 3 rows each
    assert batched["tokens_per_step"] == pytest.approx(3, rel=0.1)


def test_schema_check_catches_bad_documents(bench) -> None:
    doc = json.loads((bench["folder"] / "bench.json").read_text())
    doc["results"][0]["avg_ts"] = 0.0
    doc["results"][1]["samples_ts"] = []
    del doc["device"]["name"]
    doc["settings"]["batch"] = ["8"]
    assert len(schema_errors(doc, SCHEMA)) == 4


def test_table_record_and_progress(bench) -> None:
    lines = bench["stdout"].splitlines()
    assert lines[0] == "| model | size | params | backend | test | t/s |"
    rows = lines[2:7]
    assert [row.split(" | ")[4] for row in rows] == TESTS
    assert all(row.startswith("| tiny-llama-q8_0 | ") and " ± " in row for row in rows)
    assert "| op | ms/step | share | GB/s | TFLOP/s | of limit |" in lines  # --profile
    progress = bench["stderr"].splitlines()
    assert "bench: pp16: warm-up" in progress and "bench: batch-3: run 2/2" in progress
    record = json.loads((bench["folder"] / "record.json").read_text())
    assert set(record) == {"device", "date", "commit", "command", "rows"}
    assert record["command"].startswith("metallic ")
    assert [r["test"] for r in record["rows"]] == TESTS
    for row in record["rows"]:
        assert row["model"] == "tiny-llama-q8_0" and row["engine"] == "metallic"
        assert row["unit"] == "tok/s" and row["value"] > 0


@pytest.mark.skipif(not PLOTS, reason="matplotlib is not installed (pip install metallic[plot])")
def test_plot_is_a_png_matplotlib_reads(bench) -> None:
    image = matplotlib.image.imread(bench["folder"] / "bench.png")
    height, width, channels = image.shape
    assert width > height > 200 and channels in (3, 4)
    assert image.std() > 0  # not a blank canvas


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["-p", "0"], ["-p", "'0'"]),
        (["-n", "0"], ["-n"]),
        (["-r", "0"], ["-r", "'0'"]),
        (["-b", "0,x"], ["-b", "'0,x'"]),
        (["-b", "8,"], ["-b"]),
        (["--json", "/nonexistent/folder/bench.json"], ["--json", "No such file"]),
        (["--plot", "/"], ["--plot", "/"]),
    ],
)
def test_bad_arguments_are_one_line(cli, model: Path, flags: list[str], words: list[str]) -> None:
    code, out, err = cli("bench", str(model), "--device", "cpu", *flags)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metallic: error: "), err
    for word in words:
        assert word in lines[0]


def test_the_device_chooses_the_clock() -> None:
    assert isinstance(timer_for(torch.device("cpu")), HostTimer)
    assert isinstance(timer_for(torch.device("cuda", 0)), EventTimer)  # built without a GPU


class FakeEvent:
    """A timing event on a device whose clock moves 1 ms at each record."""

    now_ms = 0.0
    synchronized: ClassVar[list[bool]] = []

    def __init__(self) -> None:
        self.at_ms: float | None = None

    def record(self, stream: object) -> None:
        assert stream == "stream"
        FakeEvent.now_ms += 1.0
        self.at_ms = FakeEvent.now_ms

    def synchronize(self) -> None:
        FakeEvent.synchronized.append(self.at_ms == FakeEvent.now_ms)  # the last one recorded?

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at_ms is not None and end.at_ms is not None
        return end.at_ms - self.at_ms


def test_event_timer_reads_one_event_per_step_and_waits_once_a_run(model: Path) -> None:
    """With events 1 ms apart, one per call of `engine.step()` and one token per call in
    steady decode, a tg test runs at exactly 1,000 tokens/s; the timer waits once per run,
    on the run's last event, and never reads the host clock for a figure."""
    engine = Engine(model, device="cpu", dtype="f32", context_size=64)
    timer = EventTimer(torch.device("cuda"), new_event=FakeEvent, stream="stream")
    FakeEvent.synchronized = []
    settings = Settings(prompt=[8], generate=[5], batch=[], repetitions=2)
    results = run_tests(engine, settings, timer=timer)
    assert FakeEvent.synchronized == [True] * 2 * (settings.repetitions + 1)  # warm-ups too
    tg = next(r for r in results if r["kind"] == "tg")
    assert tg["samples_ts"] == pytest.approx([1000.0, 1000.0])
    assert tg["samples_s"] == pytest.approx([0.005, 0.005])
    pp = next(r for r in results if r["kind"] == "pp")
    # Submitted after one event; its first token comes back from the call after the one that
    # queued the prefill, whose event is the third: 2 ms.
    assert pp["samples_s"] == pytest.approx([0.002, 0.002])


def test_warm_up_repeats_while_it_moves_what_graphs_bake_in(model: Path, monkeypatch) -> None:
    """A warm-up whose KV cache grew leaves the memory pool to compact once idle, after which
    the next run recaptures its graphs: warm-ups go on (at most MAX_WARM_UPS) until one moves
    nothing, so no timed run pays for a capture."""
    engine = Engine(model, device="cpu", dtype="f32", context_size=64)
    moves = iter([1, 2])  # the first two warm-ups of the first test each move a tensor
    seeds: list[int] = []
    real_run_once = bench_tool.run_once

    def run_once(engine, test, seed, timer=None):
        seeds.append(seed)
        engine.store.generation += next(moves, 0)
        return real_run_once(engine, test, seed, timer)

    monkeypatch.setattr(bench_tool, "run_once", run_once)
    settings = Settings(prompt=[8], generate=[], batch=[], repetitions=2)
    run_tests(engine, settings)
    assert seeds == [-1, -2, -3, 1, 2]  # three warm-ups (the third moved nothing), two runs

    moves = iter([1] * 10)  # never settles: warm-ups stop at MAX_WARM_UPS
    seeds.clear()
    run_tests(engine, settings)
    assert seeds == [-1, -2, -3, 1, 2] and bench_tool.MAX_WARM_UPS == 3
