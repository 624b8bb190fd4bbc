"""Layers streamed from the host and moved by the residency manager give the same text, the
memory pool stays within the budget's plan, and its compaction changes no result.

On the CPU "device" and "host" share memory, but the mechanism is the one CUDA runs (packed layer
buffers, two streaming slots, a budgeted KV cache that grows, blocks moved by compaction), so its
bookkeeping and results are checked here; the CUDA copies and events are measured on the GPU
(benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from metallic.engine import engine as engine_module
from metallic.engine import loader as loader_module
from metallic.engine.engine import Engine
from metallic.engine.loader import kv_sizes
from metallic.engine.sampling import SamplingParams
from metallic.models.kv_store import KVLayout
from metallic.runtime.memory import MemoryPool
from metallic.runtime.placement import BudgetTooSmall, KVBudgetExceeded
from metallic.testing.synthetic import ModelShape, write_synthetic_model

CTX = 256
PROMPT = [(7 * i) % 500 + 3 for i in range(150)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "g.gguf", "tiny-gemma3", "Q8_0")


@pytest.fixture(autouse=True)
def small_steps(monkeypatch):
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 32)


def engine(model, **options) -> Engine:
    """Steps of at most 32 tokens (small_steps), so few sequences at once."""
    return Engine(model, device="cpu", dtype="f32", context_size=CTX, max_num_seqs=4, **options)


def greedy(e: Engine, n: int = 20) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in e.generate_tokens(PROMPT, params)]


@pytest.fixture(scope="module")
def reference(model):
    e = Engine(model, device="cpu", dtype="f32", context_size=CTX, max_num_seqs=4)
    return e.logits(PROMPT), greedy(e)


def test_streamed_layers_give_identical_results(model, reference) -> None:
    e = engine(model, gpu_layers=2)
    assert e.plan is not None and e.plan.host_layers == [2, 3, 4, 5]
    assert torch.equal(e.logits(PROMPT), reference[0])
    assert greedy(e) == reference[1]
    place = e.stats()["placement"]
    assert place["layers_on_device"] == 2 and place["layers_streamed"] == 4
    assert 0 < place["stream_slot_bytes"] < place["host_bytes"]  # two slots for four layers


def _kv_bytes(e: Engine) -> tuple[int, int]:
    """The KV cache's bytes at the full context, and the least a budget must give it."""
    layout = KVLayout.of(e.config, torch.float32)
    sizes = kv_sizes(layout, CTX, 32)
    return layout.bytes(sizes.start()), layout.bytes(sizes.least(layout, 32))


def _least_kv(e: Engine) -> int:
    return _kv_bytes(e)[1]


def test_residency_streams_layers_under_kv_pressure_and_brings_them_back(model, reference):
    roomy = engine(model, memory_budget=1 << 40).plan
    assert roomy is not None
    budget = roomy.weight_bytes + roomy.reserve_bytes + _least_kv(engine(model))
    e = engine(model, memory_budget=budget)  # every layer fits, the KV cache barely
    assert e.plan is not None and e.plan.host_layers == []
    start_kv = e.store.nbytes
    assert greedy(e) == reference[1]  # 170 tokens need more KV than the start leaves
    place = e.stats()["placement"]
    assert place["evictions"] > 0 and place["restores"] == place["evictions"]
    assert place["layers_streamed"] == 0 and e.store.nbytes == start_kv  # pressure fell
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


# Eight full-attention layers of 0.75 MiB, a KV cache that grows by 3.5 MiB over the prompt: the
# copy of one layer's keys during a resize (up to 0.2 MiB) is finer than what moving layers frees.
KV_HEAVY = ModelShape("llama", 8, 64, 512, 8, 4, 64, 512, 2048, 1e4, 1e-5, True, name="kv-heavy")


@pytest.fixture(scope="module")
def kv_heavy(tmp_path_factory):
    path = write_synthetic_model(tmp_path_factory.mktemp("kv") / "k.gguf", KV_HEAVY, "Q8_0")
    return path, greedy(engine(path))


@pytest.mark.parametrize("step", [0, 1, 2])
def test_kv_growth_keeps_the_pool_within_the_budget(kv_heavy, step) -> None:
    """The plan splits a budget into weights + KV cache (the residency manager keeps the two
    within `budget - reserve`, each growth's copy transient included) and the reserve: a step's
    activations and RUNTIME_BYTES for buffers beside them, of which the pool holds the RoPE
    tables (its activations kind). A budgeted pool is exact (no arena tails), so its reserved
    bytes may never pass `budget - reserve + activations`. Budgets from the least KV cache up,
    in steps finer than a layer, meet the growth at different points."""
    path, tokens = kv_heavy
    roomy = engine(path, memory_budget=1 << 40).plan
    assert roomy is not None
    full, least = _kv_bytes(engine(path))
    budget = roomy.weight_bytes + roomy.reserve_bytes + least + step * (full - least) // 12
    e = engine(path, memory_budget=budget)
    assert e.plan is not None and e.memory is not None and e.memory.exact
    assert greedy(e) == tokens
    assert e.stats()["placement"]["evictions"] > 0  # the cache outgrew what the start left
    pool = e.stats()["memory_pool"]
    activations = pool["kinds"]["activations"]["reserved_bytes"]
    assert 0 < activations <= loader_module.RUNTIME_BYTES
    assert pool["peak_reserved_bytes"] <= budget - e.plan.reserve_bytes + activations


def test_rope_tables_live_in_the_pool(model, reference) -> None:
    """The buffers a pooled engine keeps for the whole run (the RoPE tables, sized for the
    context) are the pool's activations; the results do not change."""
    e = engine(model, gpu_layers=6)
    assert e.memory is not None
    tables = [t for table in e.model.rope.values() for t in (table.cos, table.sin)]
    assert all(t.shape[0] >= CTX for t in tables)
    activations = e.stats()["memory_pool"]["kinds"]["activations"]
    assert activations["current_bytes"] == sum(t.nbytes for t in tables) > 0
    assert torch.equal(e.logits(PROMPT), reference[0])


def test_the_end_of_a_run_compacts_a_fragmented_pool(model, reference, monkeypatch) -> None:
    """Space freed below every weight and KV block (a spacer the pool held before the engine's
    blocks) fragments the pool; the end of the next run, a safe point, compacts it and the
    weights, streaming slots and KV cache read their moved blocks: bit-identical results."""
    spacers = []

    def pool_with_spacers(*args, **kwargs) -> MemoryPool:
        pool = MemoryPool(*args, compact_threshold=0.0, **kwargs)  # any hole counts
        for kind in ("weights", "kv"):
            spacers.append(pool.allocate(kind, (4096,), torch.uint8, name="spacer"))
        return pool

    monkeypatch.setattr(loader_module, "MemoryPool", pool_with_spacers)
    e = engine(model, gpu_layers=4)  # pooled without a budget (shared arenas), two slots
    assert e.memory is not None and not e.memory.exact and e.model.streamer is not None
    assert torch.equal(e.logits(PROMPT), reference[0])
    assert e.stats()["memory_pool"]["compactions"] == 0
    for block in spacers:
        e.memory.free(block)
    assert e.memory.fragmented("weights") and e.memory.fragmented("kv")
    before = [e.store.k[0], e.model.streamer.slots[0], e.model.weights.output_norm]
    assert torch.equal(e.logits(PROMPT), reference[0])  # compacted at its end
    pool = e.stats()["memory_pool"]
    assert pool["compactions"] == 2 and pool["generation"] == 2
    assert pool["kinds"]["weights"]["fragmentation"] == pool["kinds"]["kv"]["fragmentation"] == 0
    after = [e.store.k[0], e.model.streamer.slots[0], e.model.weights.output_norm]
    for old, new in zip(before, after, strict=True):
        assert new.data_ptr() == old.data_ptr() - 4096  # slid over the spacer's bytes
    assert torch.equal(e.logits(PROMPT), reference[0])
    assert greedy(e) == reference[1]
