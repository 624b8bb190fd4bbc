"""KV caches behind one interface: slots per sequence, a step's batch metadata, and attention.

- `ContiguousKVCache` (the CPU path): one row per slot and layer, a ring of the last W positions
  on sliding-window layers, attention in torch over the keys it hands back.
- `PagedKVCache` (the kernel path): per kind of layer a pool of fixed-size blocks; each slot's
  block table maps positions to blocks, allocated as the sequence grows and returned to a free
  list when it ends (on sliding-window layers, as soon as they leave the window). The Triton
  kernels store and attend through the tables.

Both are allocated once and reused across runs; the model calls only `attend`. Under a memory
budget the paged cache's full-attention pools start small and grow as sequences need blocks
(`grow_hook` lets the residency manager make room first), and shrink back once they are idle.
A resize reallocates one layer's tensor at a time, so besides the growth itself one tensor's
old and new copies coexist: the hook is told both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metallic.errors import MetallicError
from metallic.gguf.config import ModelConfig
from metallic.ops.attention import attention, paged_attention, store_kv
from metallic.runtime.batch import SequenceChunk, StepBatch
from metallic.runtime.memory import Block, MemoryPool

MIN_KEY_BOUND = 256  # the smallest key-count bound of a step (see PagedKVCache.key_bound)
BLOCK_SIZE = 16  # tokens per KV block


class ContextFull(MetallicError):
    """A sequence grew past the cache's context size."""


class _Slots:
    """Slot bookkeeping and the context limit, shared by both caches."""

    def __init__(self, n_slots: int, context_size: int) -> None:
        self.context_size = context_size
        self.free_slots = list(range(n_slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self.free_slots:
            raise MetallicError("no free KV-cache slot: too many sequences at once")
        return self.free_slots.pop()

    def release(self, slot: int) -> None:
        self.free_slots.append(slot)

    def check_room(self, end: int) -> None:
        if end > self.context_size:
            raise ContextFull(
                f"the sequence needs {end} positions but the context holds {self.context_size} "
                "(raise --ctx-size or shorten the prompt)"
            )


class ContiguousKVCache(_Slots):
    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        context_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(n_slots, context_size)
        self.device = device
        self.capacity = [
            min(context_size, config.sliding_window) if config.is_sliding(i) else context_size
            for i in range(config.n_layers)
        ]
        shape = (config.n_kv_heads, config.head_dim)
        self.k = [
            torch.zeros(n_slots, cap, *shape, device=device, dtype=dtype) for cap in self.capacity
        ]
        self.v = [
            torch.zeros(n_slots, cap, *shape, device=device, dtype=dtype) for cap in self.capacity
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def batch(self, chunks: Sequence[SequenceChunk]) -> StepBatch:
        for chunk in chunks:
            self.check_room(chunk.start + len(chunk.tokens))
        return StepBatch.build(chunks, self.device)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: StepBatch,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        offset = 0
        for chunk in batch.chunks:
            rows = slice(offset, offset + len(chunk.tokens))
            offset += len(chunk.tokens)
            keys, values, key_pos = self.attend_and_store(
                layer, chunk.slot, chunk.start, k[rows], v[rows]
            )
            out[rows] = attention(
                q[rows], keys, values, batch.positions[rows], key_pos, scale, window
            )
        return out

    def attend_and_store(
        self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store a step's keys/values (positions start..start+t-1) and return what it attends to:
        keys, values and their absolute positions, older positions first."""
        cap = self.capacity[layer]
        end = start + k.shape[0]
        kc, vc = self.k[layer][slot], self.v[layer][slot]
        if end <= cap:  # no wrap: write in place and attend to a view of the prefix
            kc[start:end] = k
            vc[start:end] = v
            positions = torch.arange(end, device=k.device)
            return kc[:end], vc[:end], positions
        # Ring buffer (sliding layers): older keys still in the window, then this step's.
        lo = max(0, start - cap)
        old = torch.arange(lo, start, device=k.device)
        keys = torch.cat((kc[old % cap], k))
        values = torch.cat((vc[old % cap], v))
        positions = torch.cat((old, torch.arange(start, end, device=k.device)))
        keep = torch.arange(max(start, end - cap), end, device=k.device)
        kc[keep % cap] = k[keep - start]
        vc[keep % cap] = v[keep - start]
        return keys, values, positions


class BlockPool:
    """The blocks of one kind of layer (full attention, or one sliding window W): a free list
    and, per slot, a table from logical block (position // block_size) to physical block.

    A windowed pool returns a sequence's blocks as they fall out of every query's window, so a
    sequence holds at most `live_blocks` of them however long it grows; the attention kernels
    never read keys (nor table entries) below the window."""

    def __init__(self, window: int, block_size: int, n_blocks: int) -> None:
        self.window = window
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.free = list(range(n_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.first_live: dict[int, int] = {}  # windowed pools: lowest logical block still held

    def reserve(self, slot: int, start: int, end: int) -> None:
        """Blocks for positions [0, end) of `slot` whose keys a step from `start` can still see."""
        table = self.tables.setdefault(slot, [])
        if self.window:
            keep_from = max(0, start - self.window + 1) // self.block_size
            first = self.first_live.get(slot, 0)
            for logical in range(first, min(keep_from, len(table))):
                self.free.append(table[logical])
                table[logical] = 0  # never read: below every window
            self.first_live[slot] = max(first, keep_from)
        while len(table) * self.block_size < end:
            if not self.free:
                raise MetallicError("the KV cache is out of blocks")
            table.append(self.free.pop())

    def missing(self, slot: int, end: int) -> int:
        """New blocks a reserve up to `end` takes (in a full-attention pool, which returns no
        block while its sequence lives)."""
        return max(0, -(-end // self.block_size) - len(self.tables.get(slot, ())))

    def grow(self, extra: int) -> None:
        """`extra` more physical blocks, numbered after the existing ones."""
        self.free[:0] = range(self.n_blocks + extra - 1, self.n_blocks - 1, -1)
        self.n_blocks += extra

    def release(self, slot: int) -> None:
        table = self.tables.pop(slot, [])
        first = self.first_live.pop(slot, 0)
        self.free.extend(reversed(table[first:]))

    @property
    def used(self) -> int:
        return self.n_blocks - len(self.free)


def _windows(config: ModelConfig) -> list[int]:
    """Each layer's attention window (0: full attention)."""
    return [config.sliding_window if config.is_sliding(i) else 0 for i in range(config.n_layers)]


class PagedKVCache(_Slots):
    """Per layer a pool of `BLOCK_SIZE`-token blocks: full-attention layers get enough for every
    slot at the full context (or what `kv_bytes` leaves them, growing on demand), sliding-window
    layers only for their window plus one step of `max_step_tokens` (a 32k context of Gemma 3
    keeps its 5-in-6 local layers at 1k tokens)."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        context_size: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
        max_step_tokens: int = 512,
        kv_bytes: int | None = None,
        memory: MemoryPool | None = None,
    ) -> None:
        super().__init__(n_slots, context_size)
        self.memory = memory  # where pool tensors come from (default: torch's allocator)
        self.blocks: dict[int, Block] = {}  # pool tensor data_ptr -> its memory-pool block
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_blocks = -(-context_size // block_size)
        self.scratch_slot = n_slots  # never handed out: the filler of padded batches
        # Called before growing with (bytes added, bytes of the one extra tensor held mid-copy).
        self.grow_hook: Callable[[int, int], None] | None = None
        self.generation = 0  # bumped whenever a pool tensor moves (graphs recapture)
        self.kv_shape = (config.n_kv_heads, config.head_dim)
        layer_windows, windows, self.full_blocks = _pool_sizes(
            config, n_slots, context_size, block_size, max_step_tokens
        )
        self.base_blocks = list(self.full_blocks)  # what each pool starts with and shrinks to
        self.layer_block_bytes = _layer_block_bytes(config, block_size, dtype)
        if kv_bytes is not None and 0 in windows:
            full = windows.index(0)
            windowed = sum(self.full_blocks[windows.index(w)] for w in layer_windows if w)
            fit = (kv_bytes - windowed * self.layer_block_bytes) // (
                self.layer_block_bytes * layer_windows.count(0)
            )
            least = _least_full_blocks(block_size, max_step_tokens)
            self.base_blocks[full] = min(self.full_blocks[full], max(least, fit))
        self.pools = [
            BlockPool(window, block_size, blocks)
            for window, blocks in zip(windows, self.base_blocks, strict=True)
        ]
        self.layer_pool = [windows.index(w) for w in layer_windows]
        self.k = [self._zeros(self.pools[p].n_blocks) for p in self.layer_pool]
        self.v = [self._zeros(self.pools[p].n_blocks) for p in self.layer_pool]

    @staticmethod
    def bytes_needed(
        config: ModelConfig,
        n_slots: int,
        context_size: int,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
        max_step_tokens: int = 512,
    ) -> tuple[int, int]:
        """(bytes at the full context, the least a budget must give: windowed pools whole and
        the full-attention pools room for one step and its filler)."""
        layer_windows, windows, full_blocks = _pool_sizes(
            config, n_slots, context_size, block_size, max_step_tokens
        )
        block_bytes = _layer_block_bytes(config, block_size, dtype)
        least_full = _least_full_blocks(block_size, max_step_tokens)
        full = least = 0
        for window in layer_windows:
            blocks = full_blocks[windows.index(window)]
            full += blocks * block_bytes
            least += (blocks if window else min(blocks, least_full)) * block_bytes
        return full, least

    def _zeros(self, n_blocks: int) -> torch.Tensor:
        shape = (n_blocks, self.block_size, *self.kv_shape)
        if self.memory is None:
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        block = self.memory.allocate("kv", shape, self.dtype, name="kv pool")
        block.zero_().wait()  # zeroed on the pool's side stream; this stream waits on its event
        self.blocks[block.tensor.data_ptr()] = block
        return block.tensor

    def _drop(self, t: torch.Tensor) -> None:
        block = self.blocks.pop(t.data_ptr(), None)
        if block is not None and self.memory is not None:
            self.memory.free(block)

    def rebind(self) -> None:
        """Read every pool tensor again from its block, after the memory pool moved blocks."""
        if self.memory is None:
            return
        blocks, self.blocks = self.blocks, {}
        for tensors in (self.k, self.v):
            for i, t in enumerate(tensors):
                block = blocks[t.data_ptr()]
                tensors[i] = block.tensor
                self.blocks[block.tensor.data_ptr()] = block
        self.generation += 1

    def _pool_block_bytes(self, pool: int) -> int:
        """Bytes one more block of `pool` costs across its layers (keys and values)."""
        return self.layer_pool.count(pool) * self.layer_block_bytes

    def _resize(self, pool: int, n_blocks: int, keep: int) -> None:
        """Reallocate `pool`'s tensors with `n_blocks` blocks, keeping the first `keep`."""
        for i, p in enumerate(self.layer_pool):
            if p != pool:
                continue
            for tensors in (self.k, self.v):
                new = self._zeros(n_blocks)
                new[:keep].copy_(tensors[i][:keep])
                self._drop(tensors[i])
                tensors[i] = new
        self.generation += 1

    def _ensure_blocks(self, chunks: Sequence[SequenceChunk]) -> None:
        """Grow full-attention pools that lack blocks for `chunks` (at least a step's worth)."""
        for index, pool in enumerate(self.pools):
            if pool.window:
                continue
            wanted = sum(pool.missing(c.slot, c.start + len(c.tokens)) for c in chunks)
            short = wanted - len(pool.free)
            if short <= 0:
                continue
            room = self.full_blocks[index] - pool.n_blocks
            extra = min(room, max(short, self.base_blocks[index] // 2))
            if extra < short:
                raise MetallicError("the KV cache is out of blocks")
            if self.grow_hook is not None:
                tensor_bytes = (pool.n_blocks + extra) * self.layer_block_bytes // 2
                self.grow_hook(extra * self._pool_block_bytes(index), tensor_bytes)
            keep = pool.n_blocks
            pool.grow(extra)
            self._resize(index, pool.n_blocks, keep)

    def shrink(self) -> bool:
        """Back to the starting size once no sequence holds blocks; True if memory was freed."""
        if any(slot != self.scratch_slot for pool in self.pools for slot in pool.tables):
            return False
        freed = False
        for index, pool in enumerate(self.pools):
            if pool.n_blocks == self.base_blocks[index]:
                continue
            self.pools[index] = BlockPool(pool.window, self.block_size, self.base_blocks[index])
            self._resize(index, self.base_blocks[index], 0)
            freed = True
        return freed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def stats(self) -> list[dict[str, int]]:
        """Per pool: its window (0: full attention), layers, blocks in use and in all, bytes."""
        out = []
        for index, pool in enumerate(self.pools):
            layers = [i for i, p in enumerate(self.layer_pool) if p == index]
            out.append(
                {
                    "window": pool.window,
                    "layers": len(layers),
                    "blocks_used": pool.used,
                    "blocks": pool.n_blocks,
                    "bytes": sum(2 * self.k[i].numel() * self.k[i].element_size() for i in layers),
                }
            )
        return out

    def release(self, slot: int) -> None:
        for pool in self.pools:
            pool.release(slot)
        super().release(slot)

    def batch(self, chunks: Sequence[SequenceChunk], pad_to: int = 0) -> StepBatch:
        """The step of `chunks`; with `pad_to` > their token count, a filler sequence in the
        scratch slot tops the batch up to exactly `pad_to` tokens (its keys land in the scratch
        slot's blocks, its logits are never read), so a graph captured for that many tokens
        replays for any prompt chunk up to it."""
        n_tokens = sum(len(c.tokens) for c in chunks)
        if pad_to > n_tokens:
            chunks = [*chunks, SequenceChunk(self.scratch_slot, 0, [0] * (pad_to - n_tokens))]
        for chunk in chunks:
            self.check_room(chunk.start + len(chunk.tokens))
        self._ensure_blocks(chunks)
        for chunk in chunks:
            end = chunk.start + len(chunk.tokens)
            for pool in self.pools:
                pool.reserve(chunk.slot, chunk.start, end)
        tables = [[pool.tables[chunk.slot] for chunk in chunks] for pool in self.pools]
        max_q_len = max(pad_to, n_tokens) if pad_to else None
        longest = max(chunk.start + len(chunk.tokens) for chunk in chunks)
        return StepBatch.build(
            chunks, self.device, tables, self.max_blocks, max_q_len, self.key_bound(longest)
        )

    def key_bound(self, n_keys: int) -> int:
        """The power of two from MIN_KEY_BOUND up (at most the context) that holds `n_keys`:
        few bounds, so few decode graphs, yet a short context is not split as a full one."""
        bound = MIN_KEY_BOUND
        while bound < n_keys:
            bound *= 2
        return min(bound, self.context_size)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: StepBatch,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        table = batch.block_tables[self.layer_pool[layer]]
        k_pool, v_pool = self.k[layer], self.v[layer]
        store_kv(k, v, k_pool, v_pool, batch, table)
        bound = batch.max_keys or self.context_size
        return paged_attention(q, k_pool, v_pool, batch, table, scale, window, max_seq_len=bound)


def _pool_sizes(
    config: ModelConfig, n_slots: int, context_size: int, block_size: int, max_step_tokens: int
) -> tuple[list[int], list[int], list[int]]:
    """(each layer's window, the distinct windows: one block pool each, each pool's blocks at
    the full context). A slot holds the whole context, or a window and a step; the filler slot
    of padded batches at most one step."""
    layer_windows = _windows(config)
    windows = sorted(set(layer_windows))
    max_blocks = -(-context_size // block_size)
    step_blocks = -(-max_step_tokens // block_size)
    full_blocks = []
    for window in windows:
        per_slot = max_blocks
        if window:
            live = -(-(window - 1 + max_step_tokens) // block_size) + 1
            per_slot = min(per_slot, max(live, step_blocks))
        full_blocks.append(n_slots * per_slot + min(per_slot, step_blocks))
    return layer_windows, windows, full_blocks


def _least_full_blocks(block_size: int, max_step_tokens: int) -> int:
    """The fewest blocks a full-attention pool can run with: one step and its filler."""
    return 2 * -(-max_step_tokens // block_size)


def _layer_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block in one layer: keys and values."""
    return 2 * block_size * config.n_kv_heads * config.head_dim * dtype.itemsize


KVCache = ContiguousKVCache | PagedKVCache
