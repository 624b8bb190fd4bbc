"""The profiler on the CPU: it leaves results alone, attributes time to the op that spent it,
and its rows account for the wall time of a generation; traces name every layer and op."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.models import transformer
from metallic.runtime.batch import SequenceChunk, StepBatch
from metallic.runtime.profiler import OFF, Profiler, StepShape
from metallic.testing.synthetic import write_synthetic_model
from metallic.tools.profiling import BETWEEN, ProfileSession, profile_report

LAYER_OPS = {"attn_norm", "qkv", "rope", "attention", "attn_out", "ffn_norm", "gate_up"}
LAYER_OPS |= {"activation", "down"}
OUTSIDE_OPS = {"embed", "output_norm", "output"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = write_synthetic_model(tmp_path_factory.mktemp("m") / "llama.gguf", "tiny-llama")
    return Engine(path, device="cpu", dtype="f32", context_size=256)


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(prompt, params)]


PROMPT = list(range(3, 40))


def test_profiling_changes_no_result(engine: Engine) -> None:
    expected_logits = engine.logits(PROMPT)
    expected_tokens = greedy(engine, PROMPT, 12)
    session = ProfileSession(engine)
    try:
        torch.testing.assert_close(engine.logits(PROMPT), expected_logits, rtol=0, atol=0)
        assert greedy(engine, PROMPT, 12) == expected_tokens
    finally:
        session.stop()
    assert engine.model.profiler is OFF


def test_rows_sum_to_the_measured_time(engine: Engine) -> None:
    """The wall time of a whole generation (prefill, 63 decode steps, sampling, host work)
    against the profile's rows, each phase's per-step rows times its steps."""
    session = ProfileSession(engine)
    began = time.perf_counter()
    tokens = greedy(engine, PROMPT, 64)
    wall = time.perf_counter() - began
    session.stop()
    report = profile_report(engine, session.phases())["phases"]
    assert report["prefill"]["steps"] == 1 and report["decode"]["steps"] == len(tokens) - 1
    total = sum(sum(r["ms"] for r in p["ops"]) * p["steps"] / 1e3 for p in report.values())
    print(f"profile {total * 1e3:.1f} ms, measured {wall * 1e3:.1f} ms")
    assert abs(total - wall) < 0.1 * wall, (total, wall)
    for phase in report.values():
        assert sum(r["ms"] for r in phase["ops"]) == pytest.approx(phase["step_ms"])
        assert {r["op"] for r in phase["ops"]} - {BETWEEN} == LAYER_OPS | OUTSIDE_OPS
        layers = {layer["layer"]: set(layer["ops"]) for layer in phase["layers"]}
        assert layers == {-1: OUTSIDE_OPS, 0: LAYER_OPS, 1: LAYER_OPS}


def test_time_goes_to_the_op_that_spent_it(engine: Engine, monkeypatch) -> None:
    """An activation made 20 ms slower shows as 20 ms more activation in every layer, and
    in no other op."""
    slow = transformer.gated_activation

    def sleepy(*args, **kwargs):
        time.sleep(0.02)
        return slow(*args, **kwargs)

    monkeypatch.setattr(transformer, "gated_activation", sleepy)
    session = ProfileSession(engine)
    greedy(engine, PROMPT, 3)
    session.stop()
    for phase in profile_report(engine, session.phases())["phases"].values():
        for layer in phase["layers"]:
            if layer["layer"] >= 0:
                assert layer["ops"]["activation"] >= 20
        for row in phase["ops"]:
            if row["op"] == "activation":
                assert row["ms"] >= 2 * 20
            else:
                assert row["ms"] < 20, row


def test_trace_names_every_layer_and_op(engine: Engine, tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    session = ProfileSession(engine, trace=trace)
    greedy(engine, PROMPT[:5], 3)
    session.stop()
    events = json.loads(trace.read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    layers = {f"layer {i}" for i in range(engine.config.n_layers)}
    assert layers | LAYER_OPS | OUTSIDE_OPS <= names
    steps = [n for n in names if isinstance(n, str) and n.endswith("sequences")]
    assert any(n.startswith("prefill step: 5 tokens") for n in steps)
    assert any(n.startswith("decode step: 1 tokens") for n in steps)


def test_step_shape_and_phases() -> None:
    cpu = torch.device("cpu")
    prefill = StepBatch.build([SequenceChunk(0, [5, 6, 7]), SequenceChunk(4, [8])], cpu)
    decode = StepBatch.build([SequenceChunk(9, [1]), SequenceChunk(4, [2])], cpu)
    shape = StepShape.of(prefill, every_row=False)
    assert shape == StepShape(((0, 3), (4, 1)), 2)
    assert shape.tokens == 4 and shape.phase == "prefill"
    assert StepShape.of(prefill, every_row=True).logit_rows == 4
    assert StepShape.of(decode, every_row=False).phase == "decode"


def test_marks_partition_a_forward() -> None:
    """Hand-driven marks: each op gets the time to the next mark, the last to `end`, and the
    gap between two forwards is its own figure."""
    profiler = Profiler("cpu")
    batch = StepBatch.build([SequenceChunk(0, [1])], torch.device("cpu"))
    for _ in range(2):
        profiler.begin(batch, every_row=False)
        profiler.mark("embed")
        time.sleep(0.01)
        profiler.mark("qkv", 0)
        time.sleep(0.02)
        profiler.end(torch.zeros(1))
        time.sleep(0.03)
    times = profiler.phases["decode"]
    assert times.steps == 2 and times.between_steps == 1
    embed, qkv = times.ops["embed", -1], times.ops["qkv", 0]
    assert 0.02 <= embed < qkv and qkv >= 0.04 and times.between >= 0.03
    assert times.forward == pytest.approx(embed + qkv)
    profiler.reset()
    assert profiler.phases == {}
