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
from metallic.models.roofline import Roofline
from metallic.runtime.batch import SequenceChunk, StepBatch
from metallic.runtime.profiler import GPU_FOLDED, OFF, Profiler, StepShape
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
    """The wall time of a whole generation (prefill, 127 decode steps, sampling, host work)
    against the profile's rows, each phase's per-step rows times its steps."""
    session = ProfileSession(engine)
    began = time.perf_counter()
    tokens = greedy(engine, PROMPT, 128)
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


class FakeClock:
    """Time that passes only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def slow_activation(monkeypatch) -> FakeClock:
    """A fake clock that moves 1 s in each call of the activation, and only then."""
    clock = FakeClock()
    activation = transformer.gated_activation

    def slow(*args, **kwargs):
        clock.now += 1.0
        return activation(*args, **kwargs)

    monkeypatch.setattr(transformer, "gated_activation", slow)
    return clock


def test_time_goes_to_the_op_that_spent_it(engine: Engine, slow_activation: FakeClock) -> None:
    """The activation is the only op during which the clock moves (1 s a call): the profile
    gives it 1 s per layer and step, and every other op nothing."""
    engine.model.profiler = profiler = Profiler("cpu", clock=slow_activation)
    try:
        greedy(engine, PROMPT, 3)
    finally:
        engine.model.profiler = OFF
    n_layers = engine.config.n_layers
    for phase in profile_report(engine, profiler.phases)["phases"].values():
        for layer in phase["layers"]:
            expected = 1e3 if layer["layer"] >= 0 else 0.0
            assert layer["ops"].get("activation", 0.0) == expected
            assert sum(layer["ops"].values()) == expected
        for row in phase["ops"]:
            assert row["ms"] == (n_layers * 1e3 if row["op"] == "activation" else 0.0)


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
    clock = FakeClock()
    profiler = Profiler("cpu", clock=clock)
    batch = StepBatch.build([SequenceChunk(0, [1])], torch.device("cpu"))
    for _ in range(2):
        profiler.begin(batch, every_row=False)
        profiler.mark("embed")
        clock.now += 1
        profiler.mark("qkv", 0)
        clock.now += 2
        profiler.end(torch.zeros(1))
        clock.now += 4
    times = profiler.phases["decode"]
    assert times.steps == 2 and times.between_steps == 1
    assert times.ops == {("embed", -1): 2, ("qkv", 0): 4}
    assert times.forward == 6 and times.between == 4
    assert times.shapes == {StepShape(((0, 1),), 1): 2}
    profiler.reset()
    assert profiler.phases == {}


def test_folded_ops_are_timed_and_costed_as_one(engine: Engine, slow_activation: FakeClock) -> None:
    """With the GPU's groups: 5 stamps a layer; the activation's time goes to the group it
    joins (gate_up+activation), whose bytes are those of both ops."""
    engine.model.profiler = profiler = Profiler("cpu", clock=slow_activation, fold=GPU_FOLDED)
    try:
        greedy(engine, PROMPT, 3)
    finally:
        engine.model.profiler = OFF
    groups = {"attn_norm+qkv+rope", "attention", "attn_out+ffn_norm", "gate_up+activation"}
    groups |= {"down"}
    n_layers = engine.config.n_layers
    report = profile_report(engine, profiler.phases)["phases"]["decode"]
    assert report["stamps_per_forward"] == 5 * n_layers + len(OUTSIDE_OPS) + 1  # + the end
    assert {r["op"] for r in report["ops"]} - {BETWEEN} == groups | OUTSIDE_OPS
    for layer in report["layers"]:
        expected = {"gate_up+activation": 1e3} if layer["layer"] >= 0 else {}
        assert {op: ms for op, ms in layer["ops"].items() if ms} == expected
    costs = Roofline(engine.model).costs(next(iter(profiler.phases["decode"].shapes)))
    row = next(r for r in report["ops"] if r["op"] == "gate_up+activation")
    parts = [costs[kind, i] for kind in ("gate_up", "activation") for i in range(n_layers)]
    assert row["bytes"] == pytest.approx(sum(c.bytes for c in parts))
    assert row["flops"] == pytest.approx(sum(c.flops for c in parts))
