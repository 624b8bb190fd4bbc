"""The paged KV tensors of every layer, and attention through them.

Layers are grouped into pools by attention window (0: full attention; gemma3's sliding layers
form a second pool): each layer of a pool keeps keys and values as tensors [n_blocks, block_size,
kv_heads, head_dim] indexed by the pool's physical block ids. Which blocks a sequence holds is the
engine's business (`engine/blocks.py`): a step's batch carries each sequence's table per pool.
`kv_write` says where a layer's keys and values go (RoPE stores them, in its own launch on the
GPU), and `attend` then attends through the table (Triton kernels on CUDA, torch elsewhere).

Pools change size only between steps (`resize`, decided by the engine's planner), and read their
blocks again after the memory pool compacts (`rebind`); both bump `generation`, so captured CUDA
graphs, which bake the tensors' addresses in, know to recapture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metallic.gguf.config import ModelConfig
from metallic.ops.attention import KVWrite, paged_attention
from metallic.runtime.batch import StepBatch
from metallic.runtime.memory import Block, MemoryPool, OutOfBudget

BLOCK_SIZE = 16  # tokens per KV block


@dataclass(frozen=True)
class KVLayout:
    """How a model's layers share KV pools: one pool per distinct attention window."""

    windows: tuple[int, ...]  # per pool, ascending (0: full attention, first when present)
    layer_pool: tuple[int, ...]  # per layer
    layer_block_bytes: int  # one block of one layer: keys and values
    block_size: int = BLOCK_SIZE

    @classmethod
    def of(cls, config: ModelConfig, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> KVLayout:
        layer_windows = [
            config.sliding_window if config.is_sliding(i) else 0 for i in range(config.n_layers)
        ]
        windows = tuple(sorted(set(layer_windows)))
        block_bytes = 2 * block_size * config.n_kv_heads * config.head_dim * dtype.itemsize
        return cls(windows, tuple(windows.index(w) for w in layer_windows), block_bytes, block_size)

    def pool_block_bytes(self, pool: int) -> int:
        """What one more block of `pool` costs across its layers."""
        return self.layer_pool.count(pool) * self.layer_block_bytes

    def bytes(self, n_blocks: list[int]) -> int:
        """Device bytes of pools of `n_blocks` blocks each."""
        return sum(n * self.pool_block_bytes(p) for p, n in enumerate(n_blocks))


class KVStore:
    def __init__(
        self,
        layout: KVLayout,
        n_blocks: list[int],
        config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        memory: MemoryPool | None = None,
    ) -> None:
        """Pools of `n_blocks[p]` blocks, from `memory` (else torch's allocator), zeroed."""
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.memory = memory
        self.kv_shape = (config.n_kv_heads, config.head_dim)
        self.blocks: dict[int, Block] = {}  # pool tensor data_ptr -> its memory-pool block
        self.n_blocks = list(n_blocks)
        self.generation = 0  # bumped whenever a pool tensor moves (graphs recapture)
        self.k = [self._zeros(self.n_blocks[p]) for p in layout.layer_pool]
        self.v = [self._zeros(self.n_blocks[p]) for p in layout.layer_pool]

    def _zeros(self, n_blocks: int) -> torch.Tensor:
        shape = (n_blocks, self.layout.block_size, *self.kv_shape)
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

    def resize(self, pool: int, n_blocks: int) -> None:
        """Reallocate `pool`'s tensors with `n_blocks` blocks, keeping the blocks both sizes
        have. One tensor at a time: besides the change itself, one tensor's old and new copies
        coexist (`resize_transient`). If the device cannot hold a new tensor, the layers done so
        far go back to the old size and the error (`OutOfBudget` from the memory pool, or
        torch's out-of-memory) propagates: the store is as it was."""
        old = self.n_blocks[pool]
        keep = min(n_blocks, old)
        done: list[tuple[list[torch.Tensor], int]] = []
        try:
            for i, p in enumerate(self.layout.layer_pool):
                for tensors in (self.k, self.v) if p == pool else ():
                    self._replace(tensors, i, n_blocks, keep)
                    done.append((tensors, i))
        except (OutOfBudget, torch.OutOfMemoryError):
            for tensors, i in done:
                self._replace(tensors, i, old, keep)
            raise
        finally:
            self.generation += 1
        self.n_blocks[pool] = n_blocks

    def _replace(self, tensors: list[torch.Tensor], i: int, n_blocks: int, keep: int) -> None:
        new = self._zeros(n_blocks)
        new[:keep].copy_(tensors[i][:keep])
        self._drop(tensors[i])
        tensors[i] = new

    def resize_transient(self, n_blocks: int) -> int:
        """Bytes of one layer's keys (or values) at `n_blocks`: held twice during a resize."""
        return n_blocks * self.layout.layer_block_bytes // 2

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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def pool_bytes(self, pool: int) -> int:
        return self.n_blocks[pool] * self.layout.pool_block_bytes(pool)

    def kv_write(self, layer: int, v: torch.Tensor, batch: StepBatch) -> KVWrite:
        """Where `layer`'s keys and values `v` of this step go (for `apply_rope`'s `store`)."""
        table = batch.block_tables[self.layout.layer_pool[layer]]
        return KVWrite(v, self.k[layer], self.v[layer], batch, table)

    def attend(
        self, layer: int, q: torch.Tensor, batch: StepBatch, scale: float, window: int
    ) -> torch.Tensor:
        """Each sequence's queries over its keys of `layer`, this step's included (stored
        through `kv_write` before)."""
        table = batch.block_tables[self.layout.layer_pool[layer]]
        k_pool, v_pool = self.k[layer], self.v[layer]
        bound = batch.max_keys or table.shape[1] * self.layout.block_size
        return paged_attention(q, k_pool, v_pool, batch, table, scale, window, max_seq_len=bound)
