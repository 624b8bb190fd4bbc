"""The ring buffer of sliding layers must hand attention exactly the keys a full cache would."""

import pytest
import torch

from metallic.gguf.config import ModelConfig
from metallic.runtime.kv_cache import ContextFull, ContiguousKVCache


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
