"""Paged flash-attention kernels (prefill, split-K decode, store_kv) against the torch op.

Runs in the Triton interpreter with f16 (its bf16 dots are wrong) or f32 caches. Every pool row no
sequence owns is NaN, as are the keys a sliding window has left behind: a kernel that reads one
turns its output NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from metallic.errors import MetallicError
from metallic.kernels import attention
from metallic.kernels.attention import (
    TileConfig,
    default_decode_config,
    paged_attention_decode,
    paged_attention_prefill,
    store_kv,
)
from metallic.ops.attention import attention as ref_attention

TOLERANCE = {torch.float16: 2e-3, torch.float32: 1e-5}
SMALL_TILES = TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


@dataclass
class PagedCache:
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    block_table: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def paged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_pool, v_pool, block_table), the leading arguments of the attention calls."""
        return self.k_pool, self.v_pool, self.block_table

    def poison_below(self, seq: int, position: int) -> None:
        """NaN the keys and values of `seq` below `position`: no query may read them."""
        block_size = self.k_pool.shape[1]
        for pos in range(position):
            block = int(self.block_table[seq, pos // block_size])
            self.k_pool[block, pos % block_size] = float("nan")
            self.v_pool[block, pos % block_size] = float("nan")


def packed(lengths: list[int]) -> torch.Tensor:
    """cu_seqlens of sequences of these lengths packed back to back."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def build_cache(
    seq_lens: list[int], n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> PagedCache:
    """Random keys/values stored through `store_kv` into shuffled blocks of a NaN pool."""
    n_blocks_each = [-(-n // block_size) for n in seq_lens]
    n_blocks = sum(n_blocks_each) + 2  # two spare blocks, never owned, stay NaN
    order = torch.randperm(n_blocks)
    table = torch.full((len(seq_lens), max(n_blocks_each) + 1), int(order[-1]), dtype=torch.int32)
    used = 0
    for seq, count in enumerate(n_blocks_each):
        table[seq, :count] = order[used : used + count]
        used += count
    pool_shape = (n_blocks, block_size, n_kv_heads, head_dim)
    k_pool = torch.full(pool_shape, float("nan"), dtype=dtype)
    v_pool = torch.full(pool_shape, float("nan"), dtype=dtype)
    keys = [torch.randn(n, n_kv_heads, head_dim).to(dtype) for n in seq_lens]
    values = [torch.randn(n, n_kv_heads, head_dim).to(dtype) for n in seq_lens]
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    store_kv(torch.cat(keys), torch.cat(values), k_pool, v_pool, table, packed(seq_lens), positions)
    return PagedCache(k_pool, v_pool, table, keys, values)


def reference(
    q: torch.Tensor, cache: PagedCache, seq: int, q_pos: torch.Tensor, scale: float, window: int
) -> torch.Tensor:
    keys, values = cache.keys[seq], cache.values[seq]
    k_pos = torch.arange(keys.shape[0])
    return ref_attention(q.double(), keys.double(), values.double(), q_pos, k_pos, scale, window)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def test_store_kv_writes_each_token_at_its_block_row() -> None:
    block_size, n_kv_heads, head_dim = 4, 2, 64
    table = torch.tensor([[3, 0, 6], [5, 1, 2]], dtype=torch.int32)
    pools = [torch.full((7, block_size, n_kv_heads, head_dim), float("nan")).half() for _ in "kv"]
    starts, lengths = [2, 7], [6, 3]  # a chunk in mid-sequence for each, f32 into an f16 pool
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    k = torch.randn(sum(lengths), n_kv_heads, head_dim)
    v = torch.randn(sum(lengths), n_kv_heads, head_dim)
    store_kv(k, v, *pools, table, packed(lengths), positions, max_q_len=6)
    row = 0
    for seq, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        for pos in range(start, start + length):
            block = int(table[seq, pos // block_size])
            assert torch.equal(pools[0][block, pos % block_size], k[row].half())
            assert torch.equal(pools[1][block, pos % block_size], v[row].half())
            row += 1
    for pool in pools:
        written = ~pool.isnan().all(dim=-1).all(dim=-1)
        assert int(written.sum()) == sum(lengths)  # nothing else touched


@pytest.mark.parametrize(
    ("n_q_heads", "n_kv_heads", "head_dim", "cached", "new", "window", "block_size", "dtype"),
    [
        pytest.param(4, 1, 64, [10, 0], [14, 25], 0, 8, torch.float16, id="causal-gqa4"),
        pytest.param(2, 1, 256, [8], [30], 7, 16, torch.float16, id="window-d256"),
        pytest.param(6, 2, 80, [0, 20, 3], [12, 5, 9], 16, 8, torch.float32, id="group3-f32"),
    ],
)
def test_prefill_matches_reference(
    n_q_heads: int,
    n_kv_heads: int,
    head_dim: int,
    cached: list[int],
    new: list[int],
    window: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
    cache = build_cache(seq_lens, n_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(sum(new), n_q_heads, head_dim).to(dtype)
    q_pos = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new, strict=True)])
    if window:
        for seq, first in enumerate(cached):
            cache.poison_below(seq, first - window + 1)
    scale = head_dim**-0.5
    out = paged_attention_prefill(
        q,
        *cache.paged,
        torch.tensor(seq_lens),
        packed(new),
        q_pos,
        scale,
        window,
        max_q_len=max(new),
        config=SMALL_TILES,
    )
    assert out.dtype == dtype
    cu = packed(new)
    for seq in range(len(new)):
        rows = slice(int(cu[seq]), int(cu[seq + 1]))
        ref = reference(q[rows], cache, seq, q_pos[rows], scale, window)
        assert relative_error(out[rows], ref) < TOLERANCE[dtype], f"sequence {seq}"


def test_prefill_with_default_tiles_into_a_given_output() -> None:
    cache = build_cache([40], 2, 64, 16, torch.float16)
    q = torch.randn(40, 4, 64).half()
    positions = torch.arange(40)
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor([40])
    returned = paged_attention_prefill(
        q, *cache.paged, seq_lens, packed([40]), positions, 0.125, out=out
    )
    assert returned is out
    ref = reference(q, cache, 0, positions, 0.125, 0)
    assert relative_error(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize(
    (
        "n_q_heads",
        "n_kv_heads",
        "head_dim",
        "seq_lens",
        "queries",
        "window",
        "splits",
        "dtype",
    ),
    [
        pytest.param(4, 1, 64, [5, 37, 64], 1, 0, 3, torch.float16, id="gqa4-three-seqs"),
        pytest.param(2, 1, 256, [20, 45], 4, 9, 2, torch.float16, id="window-4-queries-d256"),
        pytest.param(8, 1, 64, [16, 30], 16, 0, 2, torch.float16, id="16-queries-two-subgroups"),
        pytest.param(2, 2, 96, [33], 1, 0, 1, torch.float32, id="one-split-f32"),
        pytest.param(4, 2, 64, [50, 3], 2, 0, None, torch.float16, id="default-splits"),
        # More splits than the decode kernel merges itself: _combine_kernel's; some empty.
        pytest.param(4, 1, 64, [70, 9], 1, 0, 20, torch.float16, id="20-splits-combined"),
    ],
)
def test_decode_matches_reference(
    n_q_heads: int,
    n_kv_heads: int,
    head_dim: int,
    seq_lens: list[int],
    queries: int,
    window: int,
    splits: int | None,
    dtype: torch.dtype,
) -> None:
    cache = build_cache(seq_lens, n_kv_heads, head_dim, 8, dtype)
    if window:
        for seq, length in enumerate(seq_lens):
            cache.poison_below(seq, length - queries - window + 1)
    q = torch.randn(len(seq_lens) * queries, n_q_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = paged_attention_decode(
        q,
        *cache.paged,
        torch.tensor(seq_lens, dtype=torch.int32),
        scale,
        window,
        queries_per_seq=queries,
        max_seq_len=max(seq_lens),
        num_splits=splits,
        config=TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1),
    )
    for seq, length in enumerate(seq_lens):
        rows = slice(seq * queries, (seq + 1) * queries)
        q_pos = torch.arange(length - queries, length)
        ref = reference(q[rows], cache, seq, q_pos, scale, window)
        assert relative_error(out[rows], ref) < TOLERANCE[dtype], f"sequence {seq}"
    if splits != 1:  # the merging programs leave every arrival counter at zero for the next
        assert not attention._ARRIVALS[q.device].any()


def test_attention_rejects_bad_shapes() -> None:
    cache = build_cache([4], 1, 64, 4, torch.float16)
    seq_lens = torch.tensor([4])
    with pytest.raises(MetallicError, match="KV heads"):
        paged_attention_decode(torch.randn(1, 2, 32).half(), *cache.paged, seq_lens, 0.1)
    with pytest.raises(MetallicError, match="queries"):
        q = torch.randn(3, 2, 64).half()
        paged_attention_decode(q, *cache.paged, seq_lens, 0.1, queries_per_seq=2)


def test_decode_default_tiles_take_a_split_in_one_tile() -> None:
    """A split's tiles run serially, so a short split takes one tile, up to the widest measured."""
    widths = [default_decode_config(256, torch.bfloat16, keys).block_n for keys in (5, 25, 300)]
    assert widths == [16, 32, 32]
    assert default_decode_config(128, torch.bfloat16, 64).block_n == 64
    assert default_decode_config(256, torch.bfloat16, 25).num_stages == 1  # nothing to pipeline
    assert default_decode_config(256, torch.bfloat16, 300).num_stages > 1


def test_decode_with_default_tiles_matches_reference() -> None:
    seq_lens = [100, 41]
    cache = build_cache(seq_lens, 1, 256, 8, torch.float16)
    q = torch.randn(len(seq_lens), 4, 256).half()
    out = paged_attention_decode(q, *cache.paged, torch.tensor(seq_lens, dtype=torch.int32), 0.06)
    for seq, length in enumerate(seq_lens):
        ref = reference(q[seq : seq + 1], cache, seq, torch.tensor([length - 1]), 0.06, 0)
        assert relative_error(out[seq : seq + 1], ref) < TOLERANCE[torch.float16], f"sequence {seq}"
