"""The block manager: free lists, windows, and the prefix cache's hash chain and LRU."""

from __future__ import annotations

import pytest
import torch

from metallic.engine.blocks import BlockManager, chain_hash
from metallic.engine.sampling import SamplingParams
from metallic.engine.sequence import Sequence
from metallic.gguf.config import ModelConfig
from metallic.models.kv_store import KVLayout

BS = 16


class _Tokenizer:
    stop_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return b"x"

    def is_control(self, token_id: int) -> bool:
        return False


def _layout(window: int = 0) -> KVLayout:
    config = ModelConfig(
        arch="test",
        vocab_size=10,
        context_length=1024,
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
        sliding_layers=(True, False) if window else (),
    )
    return KVLayout.of(config, torch.float32, BS)


def _seq(tokens: list[int], n_pools: int = 1, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, seq_id, tokens, SamplingParams(), _Tokenizer(), n_pools, 1024)


def _compute(blocks: BlockManager, seq: Sequence, step: int) -> None:
    """Run `seq`'s tokens through in steps of `step`, as the scheduler and runner would."""
    while seq.num_computed < len(seq.token_ids):
        end = min(len(seq.token_ids), seq.num_computed + step)
        assert blocks.reserve(seq, seq.num_computed, end)
        seq.num_computed = end
        blocks.commit(seq)


def test_lowest_free_blocks_first_and_all_or_nothing() -> None:
    blocks = BlockManager(_layout(), [8], n_scratch=1)
    assert blocks.scratch_tables == [[0]]
    a, b = _seq(list(range(40))), _seq(list(range(100, 120)), seq_id=1)
    assert blocks.reserve(a, 0, 40) and a.tables == [[1, 2, 3]]
    assert blocks.reserve(b, 0, 20) and b.tables == [[4, 5]]
    blocks.release(a)
    assert blocks.pools[0].used == 3  # scratch and b's two
    c = _seq(list(range(200, 300)), seq_id=2)
    assert not blocks.reserve(c, 0, 100)  # 7 blocks wanted, 5 free: nothing is taken
    assert c.tables == [[]] and blocks.pools[0].n_free == 5
    assert blocks.reserve(c, 0, 48) and c.tables == [[1, 2, 3]]


def test_a_shared_prefix_is_claimed_not_computed() -> None:
    blocks = BlockManager(_layout(), [16], n_scratch=1)
    prompt = list(range(50))
    a = _seq([*prompt, 7, 8])
    _compute(blocks, a, 20)
    assert len(a.block_hashes) == 3  # 52 tokens: three full blocks
    b = _seq(prompt[:40] + [9] * 10, seq_id=1)
    blocks.match_prefix(b)
    assert b.num_computed == b.num_cached == 32  # blocks 0 and 1 are shared; block 2 differs
    assert b.tables[0] == a.tables[0][:2]
    assert [blocks.pools[0].refs[x] for x in b.tables[0]] == [2, 2]
    # The same prompt whole: every full block but the one holding the last token.
    c = _seq(prompt[:48], seq_id=2)
    blocks.match_prefix(c)
    assert c.num_computed == 32
    # The chain: equal tokens after a different block are a different block.
    d = _seq([99] * 16 + prompt[16:48], seq_id=3)
    blocks.match_prefix(d)
    assert d.num_computed == 0
    assert chain_hash(b"", prompt[:16]) == a.block_hashes[0]
    assert blocks.hits == 64 and blocks.queries == 3


def test_freed_cached_blocks_wait_in_lru_until_their_memory_is_needed() -> None:
    blocks = BlockManager(_layout(), [6], n_scratch=1)
    pool = blocks.pools[0]
    a = _seq(list(range(33)))  # two full blocks and one partial
    _compute(blocks, a, 33)
    cached = a.tables[0][:2]
    blocks.release(a)
    assert pool.used == 1 and list(pool.idle) == cached[::-1]  # the last block first
    assert pool.n_free == 5
    # Fresh blocks come from never-cached ones first ...
    b = _seq(list(range(100, 148)), seq_id=1)
    assert blocks.reserve(b, 0, 48) and not set(b.tables[0]) & set(cached)
    assert len(pool.idle) == 2
    # ... then from the least recently used cached block, whose hash is forgotten.
    c = _seq(list(range(200, 216)), seq_id=2)
    assert blocks.reserve(c, 0, 16) and c.tables[0] == [cached[1]]
    d = _seq(list(range(33)), seq_id=3)
    blocks.match_prefix(d)
    assert d.num_computed == 16 and d.tables[0] == [cached[0]]  # block 1 was evicted


def test_windowed_pools_hold_the_window_and_serve_hits_from_it() -> None:
    window = 16
    blocks = BlockManager(_layout(window), [20, 20], n_scratch=1)
    full, local = blocks.pools
    assert (full.window, local.window) == (0, window)
    a = _seq(list(range(120)), n_pools=2)
    held = []
    while a.num_computed < 120:
        end = a.num_computed + 8
        assert blocks.reserve(a, a.num_computed, end)
        held.append(len(a.tables[1]) - a.first_live[1])
        a.num_computed = end
        blocks.commit(a)
    assert max(held) <= 3 and len(a.tables[0]) == 8  # the full pool keeps every block
    assert local.used == 1 + 2 and len(local.idle) == 6  # dropped blocks stay cached
    # A new sequence with the same 120-token beginning: 112 tokens hit, and in the windowed
    # pool it holds only the blocks of the window before them.
    b = _seq(list(range(120)) + [5] * 8, n_pools=2, seq_id=1)
    blocks.match_prefix(b)
    assert b.num_computed == 112
    assert b.tables[0] == a.tables[0][:7]
    first = (112 - window + 1) // BS
    assert b.first_live[1] == first and b.tables[1][first:] == a.tables[1][first:7]
    # Evict the windowed pool's cached blocks: the hit shrinks to what it still holds.
    blocks.release(b)
    while local.idle:
        local.allocate()
    c = _seq(list(range(120)) + [5] * 8, n_pools=2, seq_id=2)
    blocks.match_prefix(c)
    assert c.num_computed == 112  # a still holds the blocks the window needs
    blocks.release(a)
    blocks.release(c)
    while local.n_free:
        local.allocate()  # taken by someone else
    d = _seq(list(range(120)), n_pools=2, seq_id=3)
    blocks.match_prefix(d)
    assert d.num_computed == 0


@pytest.mark.parametrize("cached", [False, True])
def test_pools_shrink_from_their_free_top(cached: bool) -> None:
    blocks = BlockManager(_layout(), [4], n_scratch=1, prefix_cache=cached)
    pool = blocks.pools[0]
    pool.grow(10)
    a, b = _seq(list(range(48))), _seq(list(range(100, 164)), seq_id=1)
    _compute(blocks, a, 48)
    _compute(blocks, b, 64)
    assert pool.top_free() == 2
    blocks.release(b)
    assert pool.top_free() == 6 and len(pool.idle) == (4 if cached else 0)
    pool.shrink(4)
    assert pool.n_blocks == 4 and pool.n_free == 0 and not pool.idle
    assert set(pool.block_of.values()) <= {1, 2, 3}
