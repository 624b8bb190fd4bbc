"""Many sequences at once: batched steps give each sequence its own results, and the engine
loop (continuous batching, prefix cache, preemption, abort, pool growth) changes no output."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from metallic.engine import engine as engine_module
from metallic.engine.engine import BatchError, Engine, PromptTooLong
from metallic.engine.sampling import SamplingError, SamplingParams
from metallic.engine.scheduler import Chunk, KVCacheTooSmall
from metallic.engine.sequence import Sequence
from metallic.testing.synthetic import PRESETS, write_synthetic_model

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("models")
    return {name: write_synthetic_model(folder / f"{name}.gguf", name, "Q8_0") for name in FAMILIES}


@pytest.fixture(scope="module")
def llama(models) -> Engine:
    return Engine(models["tiny-llama"], device="cpu", dtype="f32", context_size=512)


def _prompts(engine: Engine, lengths: list[int], salt: int = 0) -> list[list[int]]:
    vocab = engine.config.vocab_size
    return [[(7 * i + 13 * n + salt) % (vocab - 3) + 3 for i in range(n)] for n in lengths]


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(prompt, params)]


def batched_logits(engine: Engine, prompts: list[list[int]], nexts: list[int]) -> torch.Tensor:
    """One step prefilling every prompt together, then one decoding every sequence: the
    logits of both steps [2, N, vocab]."""
    seqs = []
    for i, prompt in enumerate(prompts):
        seq = Sequence(
            i, i, prompt, SamplingParams(), engine.tokenizer, len(engine.blocks.pools), 512
        )
        assert engine.blocks.reserve(seq, 0, len(prompt) + 1)
        seqs.append(seq)
    rows = []
    for step in range(2):
        chunks = [
            Chunk(s, 0 if step == 0 else len(s.token_ids) - 1, len(s.token_ids)) for s in seqs
        ]
        batch, _ = engine.runner.prepare(chunks, None)
        rows.append(engine.model.forward(batch, engine.store))
        for seq, token in zip(seqs, nexts, strict=True):
            seq.token_ids.append(token)
    for seq in seqs:
        engine.blocks.release(seq)
    return torch.stack(rows)


def check_batched_equals_single(engine: Engine, prompts: list[list[int]]) -> None:
    nexts = [p[0] for p in prompts]
    together = batched_logits(engine, prompts, nexts)
    for i, (prompt, token) in enumerate(zip(prompts, nexts, strict=True)):
        alone = engine.logits([*prompt, token])[-2:]
        torch.testing.assert_close(together[:, i], alone, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batched_step_equals_single_sequence_steps(models, family) -> None:
    """Prompts of different lengths prefilled in one ragged step, then decoded in one step:
    each sequence's logits are those it gets alone (gemma3: past its sliding window of 16)."""
    engine = Engine(models[family], device="cpu", dtype="f32", context_size=512)
    check_batched_equals_single(engine, _prompts(engine, [5, 17, 40, 1, 33]))


def test_a_batched_step_on_the_kernel_path(tmp_path, monkeypatch) -> None:
    """The same through the Triton kernels (interpreted): ragged prefill of several prompts in
    one launch, then decode over sequences of different lengths in one launch."""
    shape = dataclasses.replace(PRESETS["tiny-gemma3"], n_layers=2)
    path = write_synthetic_model(tmp_path / "m.gguf", shape, "Q8_0", seed=9)
    monkeypatch.setenv("METALLIC_FORCE_KERNELS", "1")
    engine = Engine(path, device="cpu", dtype="f32", context_size=64)
    check_batched_equals_single(engine, _prompts(engine, [3, 19, 8]))


def test_a_batched_step_on_the_default_model(default_model_path) -> None:
    engine = Engine(default_model_path, device="cpu", context_size=256)
    prompts = [engine.tokenizer.encode(t) for t in ("The capital of France is", "1, 2, 3,", "Hi")]
    check_batched_equals_single(engine, prompts)


def test_generate_batch_gives_each_prompt_its_own_greedy_tokens(default_model_path) -> None:
    """16 varied prompts together, against each alone: where batching changes the summation
    order, tokens may differ only at a near-tie of the alone run (top two within 0.01)."""
    engine = Engine(default_model_path, device="cpu", context_size=256)
    texts = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The quick brown fox",
        "In 1492, Columbus",
        "Water boils at",
        "My favourite colour is",
        "import numpy as np\n",
        "The largest planet in the solar system is",
        "Q: What is 2 + 2?\nA:",
        "Roses are red,",
        "The theory of relativity",
        "Bonjour, je m'appelle",
        "Step 1: preheat the oven",
        "<html><body>",
        "Photosynthesis converts",
    ]
    n = 10
    together = engine.generate_batch_tokens(texts, max_tokens=n, temperature=0, ignore_eos=True)
    assert engine.stats()["scheduler"]["steps"] < 16 * n  # they really ran together
    for text, got in zip(texts, together, strict=True):
        prompt = engine.tokenizer.encode(text)
        alone = greedy(engine, prompt, n)
        if got == alone:
            continue
        k = next(i for i, (a, b) in enumerate(zip(got, alone, strict=True)) if a != b)
        top2 = engine.logits(prompt + alone[:k])[-1].topk(2).values
        assert float(top2[0] - top2[1]) < 0.01, (text, k)


def test_a_shared_prefix_is_computed_once(models) -> None:
    cached = Engine(models["tiny-llama"], device="cpu", dtype="f32", context_size=512)
    uncached = Engine(
        models["tiny-llama"], device="cpu", dtype="f32", context_size=512, prefix_cache=False
    )
    prefix = _prompts(cached, [200])[0]
    first, second = [*prefix, 5, 6, 7], [*prefix, 9, 10, 11, 12]
    greedy(cached, first, 4)
    got = greedy(cached, second, 8)
    stats = cached.last_stats
    assert stats.cached_tokens == 192  # every full block of the shared 200 tokens
    assert stats.prompt_tokens - stats.cached_tokens == len(second) - 192
    assert cached.stats()["prefix_cache"]["hit_tokens"] == 192
    assert got == greedy(uncached, second, 8)
    assert uncached.last_stats.cached_tokens == 0


def test_preempted_sequences_finish_with_unchanged_outputs(models) -> None:
    """A KV cache for 4 sequences, 16 requests: the newest are preempted and recomputed
    later (from the prefix cache), and every output is the unconstrained one."""
    roomy = Engine(models["tiny-llama"], device="cpu", dtype="f32", context_size=128)
    prompts = _prompts(roomy, [20 + i for i in range(16)], salt=3)
    params = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    expected = roomy.generate_batch_tokens(prompts, **params)
    tight = Engine(
        models["tiny-llama"],
        device="cpu",
        dtype="f32",
        context_size=128,
        max_kv_tokens=4 * 48,
        max_num_seqs=16,
    )
    assert tight.generate_batch_tokens(prompts, **params) == expected
    scheduler = tight.stats()["scheduler"]
    assert scheduler["preemptions"] > 0 and scheduler["running"] == scheduler["waiting"] == 0
    assert tight.blocks.pools[0].used == len(tight.blocks.scratch_tables[0])


def test_abort_frees_the_blocks_at_once(llama) -> None:
    idle = [pool.used for pool in llama.blocks.pools]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids = [llama.add_request(p, params) for p in _prompts(llama, [40, 50, 60])]
    outputs: dict[object, list[int]] = {i: [] for i in ids}
    for _ in range(4):
        for out in llama.step():
            outputs[out.request_id] += out.token_ids
    used = llama.blocks.pools[0].used
    llama.abort(ids[1])
    assert llama.blocks.pools[0].used == used - 4  # its 50 + 3 positions: four blocks
    ended = []
    while llama.has_unfinished():
        for out in llama.step():
            outputs[out.request_id] += out.token_ids
            if out.finished:
                ended.append((out.request_id, out.finish_reason))
    assert ended[0] == (ids[1], "abort")
    assert sorted(ended[1:]) == [(ids[0], "length"), (ids[2], "length")]
    assert len(outputs[ids[0]]) == len(outputs[ids[2]]) == 30
    assert [pool.used for pool in llama.blocks.pools] == idle


def test_bad_requests_fail_alone(llama) -> None:
    assert llama.generate_batch([]) == []
    prompts = [*_prompts(llama, [5, 8]), list(range(3, 600)), *_prompts(llama, [6])]
    with pytest.raises(BatchError, match="1 of 4 requests failed") as failure:
        llama.generate_batch(prompts, max_tokens=4, temperature=0, ignore_eos=True)
    completions = failure.value.completions
    assert isinstance(completions[2].error, PromptTooLong)
    assert all(len(c.token_ids) == 4 for i, c in enumerate(completions) if i != 2)
    steps = llama.stats()["scheduler"]["steps"]
    with pytest.raises(SamplingError, match="top_p"):
        llama.generate_batch(prompts[:2], top_p=0)
    assert llama.stats()["scheduler"]["steps"] == steps and not llama.has_unfinished()
    with pytest.raises(MetallicErrorWithCode, match="already in use"):
        llama.add_request([3, 4], request_id="x")
        llama.add_request([3, 4], request_id="x")
    llama.abort("x")
    llama.step()


MetallicErrorWithCode = engine_module.MetallicError


def test_a_request_the_kv_cache_can_never_hold_is_rejected(models) -> None:
    engine = Engine(
        models["tiny-llama"], device="cpu", dtype="f32", context_size=256, max_kv_tokens=64
    )
    with pytest.raises(KVCacheTooSmall, match="does not fit a KV cache of 64 tokens"):
        engine.add_request(list(range(3, 100)))
    assert engine.generate([3, 4, 5], max_tokens=2)


def test_one_thread_steps_while_others_submit_and_abort(llama) -> None:
    prompts = _prompts(llama, [4, 9, 14, 19, 24, 29], salt=5)
    expected = [greedy(llama, p, 12) for p in prompts]
    results: dict[object, list[int]] = {}
    finished: dict[object, str] = {}
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            if not llama.has_unfinished():
                time.sleep(0.001)
                continue
            for out in llama.step():
                results.setdefault(out.request_id, []).extend(out.token_ids)
                if out.finished:
                    finished[out.request_id] = out.finish_reason or ""

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    driver = threading.Thread(target=drive)
    driver.start()
    submitters = [
        threading.Thread(
            target=llama.add_request, args=(p,), kwargs={"params": params, "request_id": f"r{i}"}
        )
        for i, p in enumerate(prompts)
    ]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join()
    llama.add_request(_prompts(llama, [30])[0], SamplingParams(max_tokens=500), request_id="gone")
    llama.abort("gone")
    deadline = time.monotonic() + 60
    while len(finished) < len(prompts) + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    driver.join()
    assert finished.pop("gone") == "abort"
    assert all(reason == "length" for reason in finished.values())
    assert [results[f"r{i}"] for i in range(len(prompts))] == expected


def test_window_blocks_recycled_by_decoding_match_one_pass(models, monkeypatch) -> None:
    """Decoding drops a sliding-window layer's blocks as they leave the window and reuses
    them; teacher-forced logits of the whole text in one pass (every block kept) pick the
    same tokens."""
    engine = Engine(models["tiny-gemma3"], device="cpu", dtype="f32", context_size=256)
    prompt = _prompts(engine, [40])[0]
    tokens = greedy(engine, prompt, 60)
    assert engine.config.sliding_window == 16
    logits = engine.logits(prompt + tokens)[len(prompt) - 1 : -1]
    assert logits.argmax(-1).tolist() == tokens


def test_a_hundred_runs_allocate_nothing_new(models) -> None:
    engine = Engine(models["tiny-gemma3"], device="cpu", dtype="f32", context_size=128)
    tensors = [t.data_ptr() for t in engine.store.k + engine.store.v]
    free = [pool.n_free for pool in engine.blocks.pools]
    for run in range(100):
        greedy(engine, [2 + run % 7, 3, 4], 2 + run % 5)
        assert [pool.n_free for pool in engine.blocks.pools] == free
    assert [t.data_ptr() for t in engine.store.k + engine.store.v] == tensors


def test_pools_grow_on_demand_keeping_their_keys(models) -> None:
    """The KV cache starts with one sequence's worth; four long sequences at once grow it
    (recapturing nothing on the CPU), and each gets the tokens it gets alone."""
    engine = Engine(models["tiny-llama"], device="cpu", dtype="f32", context_size=128)
    start = engine.store.nbytes
    prompts = _prompts(engine, [90, 95, 100, 105], salt=11)
    alone = [greedy(engine, p, 16) for p in prompts]
    assert engine.store.nbytes == start
    together = engine.generate_batch_tokens(prompts, max_tokens=16, temperature=0, ignore_eos=True)
    assert together == alone
    assert engine.stats()["scheduler"]["kv_growths"] > 0 and engine.store.nbytes > start


def test_decode_key_bounds_are_few() -> None:
    """Decode graphs are captured per key-count bound: powers of two from 256, at most the
    context."""
    runner = type("R", (), {"context_size": 2048})()
    bound = engine_module.ModelRunner.key_bound
    assert [bound(runner, n) for n in (1, 256, 257, 2000, 2048)] == [256, 256, 512, 2048, 2048]
