"""A contiguous KV cache: one slot per sequence, a ring of the last W positions on sliding layers.

Allocated once and reused across runs (a finished sequence just frees its slot). The paged cache
replaces this behind the same three calls: `keys_values` (what a step's attention sees),
`store` (append a step's keys and values) and slot management.
"""

from __future__ import annotations

import torch

from metallic.errors import MetallicError
from metallic.gguf.config import ModelConfig


class ContextFull(MetallicError):
    """A sequence grew past the cache's context size."""


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        context_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.context_size = context_size
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
        self.free_slots = list(range(n_slots - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

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
