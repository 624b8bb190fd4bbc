"""The ring buffer of sliding layers must hand attention exactly the keys a full cache would."""

import pytest
import torch

from metallic.engine import engine as engine_module
from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.gguf.config import ModelConfig
from metallic.runtime.batch import SequenceChunk
from metallic.runtime.kv_cache import ContextFull, ContiguousKVCache, PagedKVCache
from metallic.testing.synthetic import write_synthetic_model


def _config(window: int) -> ModelConfig:
    return ModelConfig(
        arch="test",
        vocab_size=10,
        context_length=64,
        hidden_size=8,
        n_layers=2,
        ffn_size=8,
        n_heads=1,
        n_kv_heads=1,
        head_dim=4,
        rms_eps=1e-6,
        rope_base=1e4,
        rope_dim=4,
        rope_neox=True,
        sliding_window=window,
        sliding_layers=(True, False),
    )


@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 1, 9, 2], [13, 7], [20]])
def test_ring_buffer_sees_the_window(chunks):
    window = 5
    cache = ContiguousKVCache(
        _config(window), n_slots=2, context_size=32, device=torch.device("cpu")
    )
    assert cache.capacity == [window, 32]
    slot = cache.allocate()
    keys = torch.randn(sum(chunks), 1, 4)
    start = 0
    for n in chunks:
        k = keys[start : start + n]
        got_k, _, got_pos = cache.attend_and_store(0, slot, start, k, k.clone())
        _, _, full_pos = cache.attend_and_store(1, slot, start, k, k.clone())
        assert torch.equal(full_pos, torch.arange(start + n))
        # Sliding layer: every key a query of this step can see (the last `window` positions
        # before the step's first query, plus the step itself) and at its true position.
        first_needed = max(0, start - window + 1)
        needed = set(range(first_needed, start + n))
        assert needed <= set(got_pos.tolist())
        for j, p in enumerate(got_pos.tolist()):
            assert torch.equal(got_k[j], keys[p])
        start += n


def test_context_full_and_slots():
    cache = ContiguousKVCache(_config(0), n_slots=1, context_size=8, device=torch.device("cpu"))
    with pytest.raises(ContextFull, match="context holds 8"):
        cache.check_room(9)
    slot = cache.allocate()
    with pytest.raises(Exception, match="no free KV-cache slot"):
        cache.allocate()
    cache.release(slot)
    assert cache.allocate() == slot


def _greedy_run(engine, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(prompt, params)]


@pytest.fixture(scope="module")
def gemma_engines(tmp_path_factory):
    """The tiny gemma3 preset (window 16, 5 local layers to 1 global) on both caches."""
    path = write_synthetic_model(tmp_path_factory.mktemp("m") / "g.gguf", "tiny-gemma3", "Q8_0")
    contiguous = Engine(path, device="cpu", dtype="f32", context_size=128)
    paged = Engine(path, device="cpu", dtype="f32", context_size=128)
    paged.cache = PagedKVCache(paged.config, 1, 128, torch.device("cpu"), torch.float32, 16, 32)
    return contiguous, paged


def test_paged_cache_gives_the_contiguous_cache_results(gemma_engines, monkeypatch):
    """Through the torch ops, across chunked prefill and decode far past the window, with the
    windowed pool recycling the blocks that left it."""
    contiguous, paged = gemma_engines
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 32)  # the paged cache's largest step
    prompt = list(range(5, 75))  # three prompt chunks
    torch.testing.assert_close(paged.logits(prompt), contiguous.logits(prompt))
    assert _greedy_run(paged, prompt[:40], 40) == _greedy_run(contiguous, prompt[:40], 40)


def test_windowed_pool_holds_only_the_window(gemma_engines):
    _, engine = gemma_engines
    cache = engine.cache
    window_pool, global_pool = (p for p in sorted(cache.pools, key=lambda p: -p.window))
    assert window_pool.window == 16 and global_pool.window == 0
    # window 16 + a 32-token step, in 16-token blocks: at most 4 live blocks a sequence
    # (and a 32-token step of the filler slot that pads batches)
    assert window_pool.n_blocks == 4 + 2 and global_pool.n_blocks == 8 + 2
    slot = cache.allocate()
    held = []
    for start in range(0, 120, 8):
        cache.batch([SequenceChunk(slot, start, [1] * 8)])
        held.append(window_pool.used)
    assert max(held) <= 3 and global_pool.used == 8  # 128 positions: every global block
    cache.release(slot)
    assert window_pool.used == 0 and global_pool.used == 0
    stats = {s["window"]: s for s in cache.stats()}
    assert stats[16]["layers"] == 5 and stats[0]["layers"] == 1
    assert stats[16]["bytes"] < stats[0]["bytes"] * 5


def test_a_hundred_runs_allocate_nothing_new(gemma_engines):
    """Blocks go back to the free lists and the pools are the same tensors after every run."""
    _, engine = gemma_engines
    cache = engine.cache
    pools = [t.data_ptr() for t in cache.k + cache.v]
    free = [len(p.free) for p in cache.pools]
    for run in range(100):
        _greedy_run(engine, [2 + run % 7, 3, 4], 2 + run % 5)
        assert [len(p.free) for p in cache.pools] == free
    assert [t.data_ptr() for t in cache.k + cache.v] == pools


def test_pool_grows_on_demand_keeping_its_keys_and_shrinks_back(gemma_engines, monkeypatch):
    """A budgeted cache starts with one step's blocks and grows as the sequence does: the same
    logits as the contiguous cache, then back to its starting size once idle."""
    contiguous, engine = gemma_engines
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 32)
    full = engine.cache
    grown = PagedKVCache(engine.config, 1, 128, torch.device("cpu"), torch.float32, 16, 32, 0)
    engine.cache = grown
    try:
        global_pool = next(p for p in grown.pools if not p.window)
        assert global_pool.n_blocks == 4  # a 32-token step and its filler
        requests: list[tuple[int, int, int]] = []

        def hook(extra: int, transient: int) -> None:  # asked before every growth
            requests.append((extra, transient, global_pool.n_blocks))

        grown.grow_hook = hook
        start = grown.nbytes
        prompt = list(range(5, 105))
        torch.testing.assert_close(engine.logits(prompt), contiguous.logits(prompt))
        assert requests and grown.generation == len(requests)
        assert grown.nbytes - start == sum(extra for extra, _, _ in requests)
        assert global_pool.n_blocks >= 105 // 16
        # The transient is one tensor (keys or values of one layer) at the grown size: what
        # coexists with its old copy while the layer is copied.
        layers = next(s["layers"] for s in grown.stats() if s["window"] == 0)
        for extra, transient, before in requests:
            blocks = before + extra // (layers * grown.layer_block_bytes)
            assert transient == blocks * grown.layer_block_bytes // 2
        assert grown.shrink() and next(p for p in grown.pools if not p.window).n_blocks == 4
    finally:
        engine.cache = full


def test_steps_carry_a_power_of_two_bound_on_their_key_count():
    """Decode graphs are captured per bound, so it takes few values: powers of two from
    MIN_KEY_BOUND, never past the context; a step's bound holds its longest sequence."""
    from metallic.runtime.kv_cache import MIN_KEY_BOUND

    cache = PagedKVCache(_config(0), 2, 2048, torch.device("cpu"), torch.float32, 16, 32)
    bounds = {n: cache.key_bound(n) for n in (1, MIN_KEY_BOUND, MIN_KEY_BOUND + 1, 2000, 2048)}
    assert bounds == {
        1: MIN_KEY_BOUND,
        MIN_KEY_BOUND: MIN_KEY_BOUND,
        MIN_KEY_BOUND + 1: 2 * MIN_KEY_BOUND,
        2000: 2048,
        2048: 2048,
    }
    a, b = cache.allocate(), cache.allocate()
    step = cache.batch([SequenceChunk(a, 299, [1]), SequenceChunk(b, 3, [2])])
    assert step.decode and step.max_keys == 512  # the longer sequence sees 300 keys
