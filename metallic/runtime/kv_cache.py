"""KV caches behind one interface: slots per sequence, a step's batch metadata, and attention.

- `ContiguousKVCache` (the CPU path): one row per slot and layer, a ring of the last W positions
  on sliding-window layers, attention in torch over the keys it hands back.
- `PagedKVCache` (the kernel path): per layer a pool of fixed-size blocks; each slot's block
  table maps positions to blocks, allocated as the sequence grows and returned to a free list
  when it ends. The Triton kernels store and attend through the table.

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


class PagedKVCache(_Slots):
    """Pools of `BLOCK_SIZE`-token blocks, enough for every slot at the full context."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        context_size: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        super().__init__(n_slots, context_size)
        self.device = device
        self.block_size = block_size
        self.max_blocks = -(-context_size // block_size)
        self.scratch_slot = n_slots  # never handed out: the filler of padded batches
        n_blocks = (n_slots + 1) * self.max_blocks
        shape = (n_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.free_blocks = list(range(n_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def release(self, slot: int) -> None:
        self.free_blocks.extend(reversed(self.tables.pop(slot, [])))
        super().release(slot)

    def reserve(self, slot: int, end: int) -> None:
        """Give `slot` blocks for positions [0, end)."""
        self.check_room(end)
        table = self.tables.setdefault(slot, [])
        while len(table) * self.block_size < end:
            table.append(self.free_blocks.pop())

    def batch(self, chunks: Sequence[SequenceChunk], pad_to: int = 0) -> StepBatch:
        """The step of `chunks`; with `pad_to` > their token count, a filler sequence in the
        scratch slot tops the batch up to exactly `pad_to` tokens (its keys land in the scratch
        slot's blocks, its logits are never read), so a graph captured for that many tokens
        replays for any prompt chunk up to it."""
        n_tokens = sum(len(c.tokens) for c in chunks)
        if pad_to > n_tokens:
            chunks = [*chunks, SequenceChunk(self.scratch_slot, 0, [0] * (pad_to - n_tokens))]
        for chunk in chunks:
            self.reserve(chunk.slot, chunk.start + len(chunk.tokens))
        rows = [self.tables[chunk.slot] for chunk in chunks]
        max_q_len = max(pad_to, n_tokens) if pad_to else None
        return StepBatch.build(chunks, self.device, rows, self.max_blocks, max_q_len)

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
        store_kv(k, v, self.k[layer], self.v[layer], batch)
        return paged_attention(
            q, self.k[layer], self.v[layer], batch, scale, window, max_seq_len=self.context_size
        )


KVCache = ContiguousKVCache | PagedKVCache
