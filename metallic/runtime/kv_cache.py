"""KV caches behind one interface: slots per sequence, a step's batch metadata, and attention.

- `ContiguousKVCache` (the CPU path): one row per slot and layer, a ring of the last W positions
  on sliding-window layers, attention in torch over the keys it hands back.
- `PagedKVCache` (the kernel path): per kind of layer a pool of fixed-size blocks; each slot's
  block table maps positions to blocks, allocated as the sequence grows and returned to a free
  list when it ends (on sliding-window layers, as soon as they leave the window). The Triton
  kernels store and attend through the tables.

Both are allocated once and reused across runs; the model calls only `attend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metallic.errors import MetallicError
from metallic.gguf.config import ModelConfig
from metallic.ops.attention import attention, paged_attention, store_kv
from metallic.runtime.batch import SequenceChunk, StepBatch

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

    def __init__(self, n_slots: int, blocks_per_slot: int, block_size: int, window: int) -> None:
        self.window = window
        self.block_size = block_size
        self.n_blocks = n_slots * blocks_per_slot
        self.free = list(range(self.n_blocks - 1, -1, -1))
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

    def release(self, slot: int) -> None:
        table = self.tables.pop(slot, [])
        first = self.first_live.pop(slot, 0)
        self.free.extend(reversed(table[first:]))

    @property
    def used(self) -> int:
        return self.n_blocks - len(self.free)


class PagedKVCache(_Slots):
    """Per layer a pool of `BLOCK_SIZE`-token blocks: full-attention layers get enough for every
    slot at the full context, sliding-window layers only for their window plus one step of
    `max_step_tokens` (a 32k context of Gemma 3 keeps its 5-in-6 local layers at 1k tokens)."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        context_size: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
        max_step_tokens: int = 512,
    ) -> None:
        super().__init__(n_slots, context_size)
        self.device = device
        self.block_size = block_size
        self.max_blocks = -(-context_size // block_size)
        self.scratch_slot = n_slots  # never handed out: the filler of padded batches
        slots = n_slots + 1
        windows = sorted(
            {config.sliding_window if config.is_sliding(i) else 0 for i in range(config.n_layers)}
        )
        self.pools: list[BlockPool] = []
        for window in windows:
            per_slot = self.max_blocks
            if window:
                live = -(-(window - 1 + max_step_tokens) // block_size) + 1
                per_slot = min(per_slot, max(live, -(-max_step_tokens // block_size)))
            self.pools.append(BlockPool(slots, per_slot, block_size, window))
        self.layer_pool = [
            windows.index(config.sliding_window if config.is_sliding(i) else 0)
            for i in range(config.n_layers)
        ]
        kv_shape = (config.n_kv_heads, config.head_dim)
        self.k = [
            torch.zeros(self.pools[p].n_blocks, block_size, *kv_shape, device=device, dtype=dtype)
            for p in self.layer_pool
        ]
        self.v = [torch.zeros_like(k) for k in self.k]

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
            end = chunk.start + len(chunk.tokens)
            self.check_room(end)
            for pool in self.pools:
                pool.reserve(chunk.slot, chunk.start, end)
        tables = [[pool.tables[chunk.slot] for chunk in chunks] for pool in self.pools]
        max_q_len = max(pad_to, n_tokens) if pad_to else None
        return StepBatch.build(chunks, self.device, tables, self.max_blocks, max_q_len)

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
        return paged_attention(
            q, k_pool, v_pool, batch, table, scale, window, max_seq_len=self.context_size
        )


KVCache = ContiguousKVCache | PagedKVCache
