"""The memory pool's contract on CPU: placement, reuse, compaction, metrics, budget and fills."""

from __future__ import annotations

import itertools

import pytest
import torch

from metallic.errors import MetallicError
from metallic.runtime.memory import KINDS, MemoryPool, OutOfBudget

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _pool(**kwargs) -> MemoryPool:
    kwargs.setdefault("arena_bytes", 2048)
    kwargs.setdefault("alignment", 256)
    return MemoryPool(CPU, **kwargs)


def _random_bytes(block) -> torch.Tensor:
    """Fill a block with random bytes and return a copy of them."""
    raw = block.tensor.view(-1).view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
    return raw.clone()


def _bytes(block) -> torch.Tensor:
    return block.tensor.reshape(-1).view(torch.uint8)


def _arena(pool: MemoryPool, arena_id: int) -> dict:
    return next(a for a in pool.stats()["arenas"] if a["id"] == arena_id)


def test_offsets_are_aligned():
    pool = _pool(alignment=128)
    blocks = [pool.allocate("activations", (n,), torch.float16) for n in (1, 100, 3, 64, 65)]
    for block in blocks:
        assert block.offset % 128 == 0
        storage = block.tensor.untyped_storage().data_ptr()
        assert block.tensor.data_ptr() - storage == block.offset
    assert [b.offset for b in blocks] == [0, 128, 384, 512, 640]


def test_views_share_the_arena_and_do_not_overlap():
    pool = _pool()
    blocks = [pool.allocate("kv", (3, 40), torch.float32) for _ in range(3)]
    assert len({b.arena for b in blocks}) == 1
    assert len({b.tensor.untyped_storage().data_ptr() for b in blocks}) == 1
    spans = sorted((b.tensor.data_ptr(), b.tensor.data_ptr() + b.nbytes) for b in blocks)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start


def test_records_dtype_shape_element_size_and_quant():
    pool = _pool()
    half = pool.allocate("activations", (4, 8), torch.float16, name="h")
    assert (half.kind, half.dtype, half.shape, half.element_size, half.nbytes) == (
        "activations",
        torch.float16,
        (4, 8),
        2,
        64,
    )
    assert half.tensor.dtype == torch.float16 and half.tensor.shape == (4, 8)
    assert half.quant is None and half.name == "h"
    q4k = pool.allocate("weights", (144 * 3,), torch.uint8, quant="Q4_K", name="blk.0.ffn_up")
    assert (q4k.dtype, q4k.shape, q4k.element_size, q4k.nbytes) == (torch.uint8, (432,), 1, 432)
    assert q4k.quant == "Q4_K" and q4k.name == "blk.0.ffn_up" and q4k.kind == "weights"
    assert q4k.arena != half.arena  # arenas belong to one kind
    with pytest.raises(MetallicError, match="unknown memory kind"):
        pool.allocate("scratch", (4,), torch.float32)


def test_writes_stay_in_their_block():
    pool = _pool()
    dtypes = (torch.float32, torch.int8, torch.bfloat16, torch.int64)
    blocks = [pool.allocate("activations", (37,), dtype) for dtype in dtypes]
    before = [_random_bytes(b) for b in blocks]
    for i, block in enumerate(blocks):
        block.tensor.fill_(7)
        for j, other in enumerate(blocks):
            if j > i:
                assert torch.equal(_bytes(other), before[j])


def test_freed_space_is_reused_without_a_new_arena():
    pool = _pool()
    a = pool.allocate("kv", (64,), torch.float32)
    b = pool.allocate("kv", (64,), torch.float32)
    pool.free(a)
    c = pool.allocate("kv", (60,), torch.float32)
    assert (c.arena, c.offset) == (a.arena, 0)
    assert b.offset == 256
    assert pool.stats()["kinds"]["kv"]["arenas"] == 1


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_free_coalesces_neighbours(order):
    pool = _pool(arena_bytes=1024)
    blocks = [pool.allocate("staging", (256,), torch.uint8) for _ in range(4)]
    for i in order:
        pool.free(blocks[i])
    arena = _arena(pool, blocks[0].arena)
    assert (arena["free_bytes"], arena["largest_free"]) == (768, 768)
    assert pool.fragmentation("staging") == 0.0
    pool.free(blocks[3])
    assert _arena(pool, blocks[0].arena)["largest_free"] == 1024


def test_big_allocation_gets_a_dedicated_arena_and_trim_releases_it():
    pool = _pool(arena_bytes=1024)
    small = pool.allocate("weights", (10,), torch.uint8)
    big = pool.allocate("weights", (3000,), torch.uint8, quant="Q8_0")
    assert big.arena != small.arena and big.offset == 0
    assert _arena(pool, big.arena)["size"] == 3072  # exactly its aligned size
    assert pool.reserved_bytes == 1024 + 3072
    assert pool.trim() == 0  # both arenas hold something
    pool.free(big)
    assert pool.trim() == 3072
    assert pool.reserved_bytes == 1024
    assert pool.stats()["peak_reserved_bytes"] == 1024 + 3072


def test_fragmentation_of_a_pattern():
    pool = _pool()  # one arena of 8 slots of 256 bytes
    blocks = [pool.allocate("kv", (64,), torch.float32) for _ in range(8)]
    assert pool.fragmentation("kv") == 0.0  # full: no free bytes
    for i in (1, 3, 4):
        pool.free(blocks[i])
    assert pool.fragmentation("kv") == pytest.approx(1 - 512 / 768)
    assert pool.stats()["kinds"]["kv"]["fragmentation"] == pytest.approx(1 / 3)


def test_compaction_preserves_bytes_and_defragments():
    pool = _pool()
    sizes = (256, 512, 768, 256)  # b and c slide over their own old bytes
    blocks = [pool.allocate("activations", (n // 4,), torch.float32) for n in sizes]
    pool.free(blocks[0])
    pool.allocate("kv", (8,), torch.float32)  # another kind stays where it is
    live = blocks[1:]
    before = [_random_bytes(b) for b in live]
    old_ptrs = [b.tensor.data_ptr() for b in live]
    assert pool.fragmentation("activations") > 0
    moved = pool.compact("activations")
    assert moved == 512 + 768 + 256
    assert [b.offset for b in live] == [0, 512, 1280]
    for block, data, ptr in zip(live, before, old_ptrs, strict=True):
        assert torch.equal(_bytes(block), data)
        assert block.tensor.data_ptr() != ptr
        assert block.tensor.data_ptr() - block.tensor.untyped_storage().data_ptr() == block.offset
    assert pool.fragmentation("activations") == 0.0
    assert pool.generation == 1 and pool.stats()["compactions"] == 1
    assert pool.compact("activations") == 0 and pool.generation == 1  # nothing left to move


def test_compaction_moves_into_fewer_arenas():
    pool = _pool(arena_bytes=1024)
    blocks = [pool.allocate("weights", (256,), torch.uint8, quant="Q4_0") for _ in range(8)]
    assert pool.stats()["kinds"]["weights"]["arenas"] == 2
    for i in (0, 1, 4, 5):
        pool.free(blocks[i])
    live = [blocks[i] for i in (2, 3, 6, 7)]
    before = [_random_bytes(b) for b in live]
    pool.compact("weights")
    assert {b.arena for b in live} == {blocks[0].arena}
    assert [b.offset for b in live] == [0, 256, 512, 768]
    assert all(torch.equal(_bytes(b), d) for b, d in zip(live, before, strict=True))
    assert pool.reserved_bytes == 1024  # the emptied arena was released
    pool.free(live[0])  # handles stay usable after moving
    assert pool.allocate("weights", (256,), torch.uint8).offset == 0


def test_maybe_compact_threshold():
    pool = _pool(compact_threshold=0.5)
    blocks = [pool.allocate("kv", (64,), torch.float32) for _ in range(8)]
    for i in (1, 3, 4):  # fragmentation 1/3: below the threshold
        pool.free(blocks[i])
    assert pool.maybe_compact("kv") == 0 and pool.generation == 0
    pool.free(blocks[6])  # ranges 256, 512, 256 of 1024 free: fragmentation 1/2, not above
    assert pool.maybe_compact("kv") == 0
    pool.free(blocks[0])  # ranges 512 (merged), 512, 256 of 1280: 0.6
    assert pool.maybe_compact("kv") == 3 * 256
    assert pool.fragmentation("kv") == 0.0 and pool.generation == 1


def test_current_peak_and_average_with_a_fake_clock():
    clock = FakeClock()
    pool = _pool(clock=clock)
    a = pool.allocate("weights", (100,), torch.uint8)
    clock.t = 1.0
    b = pool.allocate("kv", (50,), torch.float32)  # 200 bytes
    clock.t = 2.0
    stats = pool.stats()
    assert (stats["current_bytes"], stats["peak_bytes"], stats["average_bytes"]) == (300, 300, 200)
    assert stats["kinds"]["weights"]["average_bytes"] == 100
    assert stats["kinds"]["kv"]["average_bytes"] == 100  # 0 for 1 s, then 200 for 1 s
    pool.free(b)
    clock.t = 4.0
    stats = pool.stats()
    assert (stats["current_bytes"], stats["peak_bytes"]) == (100, 300)
    assert stats["average_bytes"] == (100 + 300 + 2 * 100) / 4
    assert stats["kinds"]["kv"]["current_bytes"] == 0
    assert stats["kinds"]["kv"]["peak_bytes"] == 200
    assert stats["kinds"]["kv"]["reserved_bytes"] == 2048  # the arena stays until trim
    assert set(stats["kinds"]) == set(KINDS)
    pool.free(a)
    assert pool.stats()["kinds"]["weights"]["blocks"] == 0


def test_a_full_device_is_one_clear_line_and_changes_nothing(monkeypatch):
    """A device out-of-memory while making an arena: the pool first releases its empty arenas
    and tries once more; if that fails too, a one-line OutOfBudget and the pool as it was."""
    pool = _pool(arena_bytes=1024, clock=FakeClock())
    kept = pool.allocate("weights", (256,), torch.uint8)
    data = _random_bytes(kept)
    pool.free(pool.allocate("kv", (256,), torch.uint8))  # an empty kv arena, releasable
    real_empty = torch.empty
    tries = []

    def full_device(*args, **kwargs):
        if args == (0,):  # a block's placeholder view, not device memory
            return real_empty(*args, **kwargs)
        tries.append(args)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")

    monkeypatch.setattr(torch, "empty", full_device)
    with pytest.raises(OutOfBudget) as err:
        pool.allocate("activations", (4096,), torch.uint8)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert len(tries) == 2  # once, then again after releasing the empty arena
    message = str(err.value)
    assert "\n" not in message and "activations" in message and "4096" in message
    assert (err.value.requested, err.value.in_use) == (4096, 1024)
    assert isinstance(err.value, MetallicError)
    assert pool.reserved_bytes == 1024 and pool.stats()["kinds"]["activations"]["blocks"] == 0
    assert torch.equal(_bytes(kept), data)


def test_exact_pool_gives_each_block_its_arena_and_releases_it_on_free():
    """A budgeted engine's pool: reserved bytes are the blocks' (aligned) bytes at every moment,
    even while a tensor is replaced by a bigger one, so a budget sees everything it holds."""
    pool = _pool(arena_bytes=4096, exact=True)
    small = pool.allocate("kv", (10,), torch.float32)
    other = pool.allocate("kv", (10,), torch.float32)
    assert small.arena != other.arena and small.offset == other.offset == 0
    assert pool.reserved_bytes == 2 * 256  # no arena tails
    bigger = pool.allocate("kv", (100,), torch.float32)  # a resize: old and new coexist
    assert pool.reserved_bytes == 2 * 256 + 512
    pool.free(small)  # its arena leaves at once, no trim needed
    assert pool.reserved_bytes == 256 + 512
    assert pool.stats()["kinds"]["kv"]["arenas"] == 2
    assert pool.fragmentation("kv") == 0.0 and not pool.fragmented("kv")
    assert pool.compact("kv") == 0 and pool.generation == 0  # nothing ever needs to move
    for block in (other, bigger):
        pool.free(block)
    assert pool.reserved_bytes == 0
    assert pool.stats()["peak_reserved_bytes"] == 2 * 256 + 512


def test_double_free_is_an_error():
    pool = _pool()
    block = pool.allocate("staging", (10,), torch.float32)
    pool.free(block)
    with pytest.raises(MetallicError, match="already freed"):
        pool.free(block)
    assert pool.stats()["current_bytes"] == 0


def test_fill_zero_wait_and_ready_on_cpu():
    pool = _pool()
    block = pool.allocate("kv", (4, 4), torch.float16)
    assert block.fill_(3.0) is block
    assert torch.equal(block.tensor, torch.full((4, 4), 3.0, dtype=torch.float16))
    assert block.event is None and block.ready  # synchronous on CPU: no event
    block.wait()
    block.zero_()
    assert not block.tensor.any()
    assert block.ready
