"""A device budget for the whole process: the plan's terms for the 8B at 2 GiB beside a CUDA
context of the size measured on an H200 (computed from a sparse file, nothing allocated), the
sequences a budget admits, the embedding read from host memory, eager prompt chunks, and a step
the budget cannot hold as a one-line error. The GPU side (NVML peak, greedy tokens) is
benchmarks/gpu_budget.py's."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from metallic.engine import loader as loader_module
from metallic.engine.engine import Engine
from metallic.engine.loader import (
    WIDEN_LIMIT_BYTES,
    admit_sequences,
    kv_sizes,
    plan_placement,
)
from metallic.engine.model_runner import StepOutOfMemory, decode_graph_rows
from metallic.engine.sampling import SamplingParams
from metallic.engine.scheduler import Chunk
from metallic.engine.sequence import Sequence
from metallic.gguf.reader import open_gguf
from metallic.models.kv_store import KVLayout
from metallic.models.validate import model_config
from metallic.runtime.budget import KERNEL_MODULE_BYTES
from metallic.runtime.placement import BudgetTooSmall, MiB, plan_memory
from metallic.testing.synthetic import PRESETS, write_synthetic_model

H200_CONTEXT = 685 * MiB  # the CUDA context and libraries, measured at start-up on the H200
STEP_TOKENS, MAX_SEQS, CONTEXT = 512, 64, 4096  # the engine's defaults for the 8B


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    path = tmp_path_factory.mktemp("8b") / "llama3-8b.gguf"
    gguf = open_gguf(write_synthetic_model(path, "llama3-8b", "Q4_K_M", fill="sparse"))
    return gguf, model_config(gguf)


def plan_8b(llama8b, budget: int | None, context: int = H200_CONTEXT):
    gguf, config = llama8b
    layout = KVLayout.of(config, torch.bfloat16)
    sizes = kv_sizes(layout, CONTEXT, STEP_TOKENS)
    overhead = (("CUDA context and libraries", context), ("kernel modules", KERNEL_MODULE_BYTES))
    plan, seqs = plan_placement(
        gguf, config, layout, sizes, dtype=torch.bfloat16, act_dtype=torch.bfloat16,
        native=True, step_tokens=STEP_TOKENS, n_seqs=MAX_SEQS, context_size=CONTEXT,
        gpu_layers=None, budget=budget, overhead=overhead if budget else (),
    )  # fmt: skip
    return plan, seqs, layout.bytes(sizes.least(layout, STEP_TOKENS))


def test_the_8b_fits_2_gib_beside_the_h200s_cuda_context(llama8b) -> None:
    """Every term of the plan sums within 2 GiB: the embedding stays in host memory, every
    layer streams through two slots, a product widens at most WIDEN_LIMIT_BYTES, and the
    budget admits as many sequences as cost no resident layer."""
    gguf, config = llama8b
    budget = 2048 * MiB
    plan, seqs, least = plan_8b(llama8b, budget)
    assert plan.weight_bytes + plan.kv_bytes + plan.reserve_bytes <= budget
    assert plan.host_layers == list(range(32))
    assert plan.host_fixed_bytes == gguf.tensor("token_embd.weight").n_bytes  # 282 MiB
    assert plan.fixed_bytes < gguf.tensor("output.weight").n_bytes + MiB  # output and norms
    assert plan.kv_bytes >= least
    reserve = dict(plan.reserve)
    assert reserve["CUDA context and libraries"] == H200_CONTEXT
    assert reserve["widened matrices"] == WIDEN_LIMIT_BYTES
    assert 1 < seqs < MAX_SEQS
    assert reserve[f"logits and sampling ({seqs} at once)"] == seqs * config.vocab_size * 48
    assert reserve["decode graphs"] == decode_graph_rows(seqs, CONTEXT) * config.vocab_size * 4


def test_the_8b_minimum_is_below_2_gib_and_below_it_is_a_one_line_error(llama8b) -> None:
    with pytest.raises(BudgetTooSmall) as err:
        plan_8b(llama8b, 1536 * MiB)
    message = str(err.value)
    assert "\n" not in message and "CUDA context and libraries 685" in message
    minimum = int(re.search(r"needs at least (\d+) MiB", message).group(1))
    assert minimum < 2048
    plan, seqs, _ = plan_8b(llama8b, (minimum + 1) * MiB)  # MiB rounding: one more
    assert seqs == 1 and plan.host_layers == list(range(32))


def test_sequence_reserves_follow_what_the_budget_admits(llama8b) -> None:
    """The logits, sampling and decode-graph reserves are those of the sequences a budget
    admits: all 64 where the budget is roomy, fewer where it is tight."""
    roomy, roomy_seqs, _ = plan_8b(llama8b, 64 << 30)
    tight, tight_seqs, _ = plan_8b(llama8b, 2048 * MiB)
    assert roomy_seqs == MAX_SEQS and roomy.host_layers == []
    assert tight_seqs < roomy_seqs

    def sequence_bytes(plan) -> int:
        return sum(n for what, n in plan.reserve if "sampling" in what or "graphs" in what)

    assert sequence_bytes(tight) < sequence_bytes(roomy) / 4
    unbudgeted, seqs, _ = plan_8b(llama8b, None)
    assert seqs == MAX_SEQS and unbudgeted.host_fixed_bytes == 0  # nothing left to the host


def test_a_budget_admits_the_most_sequences_that_keep_the_placement() -> None:
    """Halving from the engine's limit: the first that keeps the single sequence's resident
    layers; a budget too small for one sequence is the minimum-budget error."""
    layers, fixed, least = [100] * 8, 50, 40

    def plan_for(budget: int):
        return lambda seqs: plan_memory(layers, fixed, 400, least, 10 * seqs, budget=budget)

    # weights 50 + 100 per resident layer + 200 (slots), least KV 40, 10 per sequence
    single = plan_for(650)(1)
    assert single.on_device == (True,) * 3 + (False,) * 5  # 50 bytes to spare
    plan, seqs = admit_sequences(plan_for(650), 64, budgeted=True)
    assert plan.on_device == single.on_device and seqs == 4  # 8 would cost a layer
    with pytest.raises(BudgetTooSmall):
        admit_sequences(plan_for(100), 64, budgeted=True)


def test_decode_graph_rows_count_the_graphs_the_runner_captures(tmp_path) -> None:
    """One graph per power-of-two batch and per key-count bound the runner uses."""
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q8_0")
    e = Engine(path, device="cpu", dtype="f32", context_size=1024)
    bounds = {e.runner.key_bound(n) for n in range(1, 1025)}
    assert bounds == {256, 512, 1024}
    assert decode_graph_rows(5, 1024) == len(bounds) * (1 + 2 + 4 + 8)
    assert decode_graph_rows(1, 200) == 1


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("n") / "l.gguf", "tiny-llama", "Q8_0")


def greedy(e: Engine, prompt: list[int], n: int = 4) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in e.generate_tokens(prompt, params)]


def test_a_budgeted_engine_reads_the_embedding_from_host_memory(tmp_path, monkeypatch):
    """On the kernel path (interpreted, one layer: it is slow) a budget leaves the embedding
    outside the memory pool and bounds the widening; logits and tokens are those of the engine
    without a budget."""
    shape = dataclasses.replace(PRESETS["tiny-llama"], n_layers=1)
    path = write_synthetic_model(tmp_path / "m.gguf", shape, "Q8_0")
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    options = {"device": "cpu", "dtype": "f32", "context_size": 64, "max_num_seqs": 4}
    reference = Engine(path, **options)
    e = Engine(path, memory_budget=1 << 40, **options)
    assert e.plan is not None and e.residency.host_embedding is not None
    embedding = e.gguf.tensor("token_embd.weight").n_bytes
    assert e.plan.host_fixed_bytes == embedding
    assert e.stats()["placement"]["host_embedding_bytes"] >= embedding
    planes = e.model.weights.embedding.native[0].planes
    held = e.residency.host_embedding.buffer
    assert all(held.data_ptr() <= p.data_ptr() < held.data_ptr() + held.numel() for p in planes)
    pool_weights = e.stats()["memory_pool"]["kinds"]["weights"]["current_bytes"]
    everything = reference.stats()["memory_pool"]["kinds"]["weights"]["current_bytes"]
    assert pool_weights + embedding == everything  # the pool holds all but the embedding
    assert e.model.widen_limit == WIDEN_LIMIT_BYTES and reference.model.widen_limit is None
    prompt = [(5 * i) % 500 + 3 for i in range(8)]
    assert torch.equal(e.logits(prompt), reference.logits(prompt))
    assert greedy(e, prompt, 2) == greedy(reference, prompt, 2)


def test_the_engine_runs_the_sequences_the_budget_admits(tiny_llama, monkeypatch) -> None:
    """With sequences made costly (64 MiB of sampling each), a budget with room for two runs
    at most two at once, however many the engine was given."""
    monkeypatch.setattr(loader_module, "LOGIT_BYTES", 64 * MiB // 512)  # a vocabulary of 512
    options = {"device": "cpu", "dtype": "f32", "context_size": 64}
    one = Engine(tiny_llama, memory_budget=1 << 40, max_num_seqs=1, **options)
    assert one.plan is not None
    layout = one.store.layout
    least = layout.bytes(kv_sizes(layout, 64, 512).least(layout, 512))
    budget = one.plan.weight_bytes + one.plan.reserve_bytes + least + 100 * MiB
    e = Engine(tiny_llama, memory_budget=budget, max_num_seqs=4, **options)
    assert e.plan is not None and e.plan.on_device == one.plan.on_device
    assert e.scheduler.max_num_seqs == 2
    assert e.planner.max_blocks == e._kv_sizes.most(2)
    prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11]]
    assert [len(t) for t in e.generate_batch_tokens(prompts, max_tokens=3)] == [3, 3, 3]


def test_prompt_chunks_run_eagerly_under_a_budget_padded_as_for_a_graph(tmp_path) -> None:
    """Under a budget a prompt chunk is not captured (its activations would stay in the graphs'
    pool beside the eager steps' own) but padded to its bucket all the same, so it runs the
    graph's kernels; decode steps are still captured."""
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q8_0")
    e = Engine(path, device="cpu", dtype="f32", context_size=64)
    runner = e.runner
    seq = Sequence(0, 0, list(range(3, 15)), SamplingParams(), e.tokenizer, 1, 64)
    assert e.blocks.reserve(seq, 0, 12)
    runner.cuda_graphs = True  # prepare pads as for a graph (nothing is captured here)
    for budgeted, graphed_prompt in ((False, True), (True, False)):
        runner.budgeted = budgeted
        batch, graphed = runner.prepare([Chunk(seq, 0, 11)], None)
        assert graphed == graphed_prompt and batch.n_tokens == 16  # padded to the bucket
        _, graphed = runner.prepare([Chunk(seq, 11, 12)], None)
        assert graphed  # a decode step


def test_a_step_the_budget_cannot_hold_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    """torch's allocator, capped by the budget, fails a step with its out-of-memory error: the
    request ends with a one-line error, and the engine runs the next one."""
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q8_0")
    e = Engine(path, device="cpu", dtype="f32", context_size=64)
    forward = e.model.forward

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n...")

    monkeypatch.setattr(e.model, "forward", out_of_memory)
    with pytest.raises(StepOutOfMemory) as err:
        e.generate([3, 4, 5], max_tokens=2)
    assert "\n" not in str(err.value) and "raise --gpu-memory" in str(err.value)
    monkeypatch.setattr(e.model, "forward", forward)
    assert len(greedy(e, [3, 4, 5], 2)) == 2
