"""Layers streamed from the host and moved by the residency manager give the same text.

On the CPU "device" and "host" share memory, but the mechanism is the one CUDA runs (packed layer
buffers, two streaming slots, a budgeted KV cache that grows), so its bookkeeping and results
are checked here; the CUDA copies and events are measured on the GPU (benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from metallic.engine import engine as engine_module
from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.runtime.kv_cache import PagedKVCache
from metallic.runtime.placement import BudgetTooSmall, KVBudgetExceeded
from metallic.testing.synthetic import write_synthetic_model

CTX = 256
PROMPT = [(7 * i) % 500 + 3 for i in range(150)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "g.gguf", "tiny-gemma3", "Q8_0")


@pytest.fixture(autouse=True)
def small_steps(monkeypatch):
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 32)


def engine(model, **options) -> Engine:
    return Engine(model, device="cpu", dtype="f32", context_size=CTX, **options)


def greedy(e: Engine, n: int = 20) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in e.generate_tokens(PROMPT, params)]


@pytest.fixture(scope="module")
def reference(model):
    e = Engine(model, device="cpu", dtype="f32", context_size=CTX)
    return e.logits(PROMPT), greedy(e)


def test_streamed_layers_give_identical_results(model, reference) -> None:
    e = engine(model, gpu_layers=2)
    assert e.plan is not None and e.plan.host_layers == [2, 3, 4, 5]
    assert torch.equal(e.logits(PROMPT), reference[0])
    assert greedy(e) == reference[1]
    place = e.stats()["placement"]
    assert place["layers_on_device"] == 2 and place["layers_streamed"] == 4
    assert 0 < place["stream_slot_bytes"] < place["host_bytes"]  # two slots for four layers


def _least_kv(e: Engine) -> int:
    return PagedKVCache.bytes_needed(e.config, 1, CTX, torch.float32, 16, 32)[1]


def test_residency_streams_layers_under_kv_pressure_and_brings_them_back(model, reference):
    roomy = engine(model, memory_budget=1 << 40).plan
    assert roomy is not None
    budget = roomy.weight_bytes + roomy.reserve_bytes + _least_kv(engine(model))
    e = engine(model, memory_budget=budget)  # every layer fits, the KV cache barely
    assert e.plan is not None and e.plan.host_layers == []
    start_kv = e.cache.nbytes
    assert greedy(e) == reference[1]  # 170 tokens need more KV than the start leaves
    place = e.stats()["placement"]
    assert place["evictions"] > 0 and place["restores"] == place["evictions"]
    assert place["layers_streamed"] == 0 and e.cache.nbytes == start_kv  # pressure fell
    assert greedy(e) == reference[1]  # and again, from the same state
    assert e.stats()["placement"]["evictions"] == 2 * place["evictions"]


def test_budget_errors_are_clear(model) -> None:
    with pytest.raises(BudgetTooSmall, match="too small: this model needs at least"):
        engine(model, memory_budget=1000)
    # Every layer streamed and the least KV cache: a long prompt cannot get its blocks.
    streamed = engine(model, gpu_layers=0).plan
    assert streamed is not None
    e = engine(
        model,
        memory_budget=streamed.weight_bytes + streamed.reserve_bytes + _least_kv(engine(model)),
    )
    assert e.plan is not None and len(e.plan.host_layers) == 6
    with pytest.raises(KVBudgetExceeded, match="raise --gpu-memory or lower --ctx-size"):
        greedy(e)
    assert isinstance(e.generate([3, 4, 5], max_tokens=2), str)  # its slot came back
