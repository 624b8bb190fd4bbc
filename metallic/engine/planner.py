"""How big the KV pools are, decided between steps.

The pools start at one sequence's worth at the full context (or what a device budget leaves
them), and grow when the scheduler finds too few free blocks for the work it wants to run:
without a budget they double, as far as the device allows; under one, the residency manager
first streams layers to make room (`engine/residency.py`). When neither works the scheduler
preempts instead: growing never ends in an out-of-memory error. Once the engine is idle, a
budgeted engine shrinks its pools back to where they started and brings its layers home, and
any engine compacts its memory pool where fragmented.
"""

from __future__ import annotations

import logging

import torch

from metallic.engine.blocks import BlockManager
from metallic.engine.residency import Residency
from metallic.models.kv_store import KVStore
from metallic.runtime.memory import OutOfBudget

log = logging.getLogger("metallic")


class KVPlanner:
    def __init__(
        self,
        store: KVStore,
        blocks: BlockManager,
        residency: Residency,
        max_blocks: list[int],
    ) -> None:
        """`max_blocks`: per pool, the most blocks that can ever be useful (every sequence at
        the full context, and the scratch)."""
        self.store = store
        self.blocks = blocks
        self.residency = residency
        self.base_blocks = list(store.n_blocks)
        self.max_blocks = max_blocks
        self.budgeted = residency.policy is not None
        self.growths = 0

    def grow(self, need: list[int]) -> bool:
        """Make every pool p hold at least `need[p]` free blocks; False if it cannot be done."""
        pools = self.blocks.pools
        short = [max(0, n - pool.n_free) for n, pool in zip(need, pools, strict=True)]
        if not any(short):
            return True
        least = [pool.n_blocks + s for pool, s in zip(pools, short, strict=True)]
        if any(n > top for n, top in zip(least, self.max_blocks, strict=True)):
            return False
        # Grow generously (each growth recaptures the graphs): double without a budget, by half
        # the starting size under one; else just what is missing.
        step = [
            (b // 2 if self.budgeted else pool.n_blocks) if s else 0
            for b, pool, s in zip(self.base_blocks, pools, short, strict=True)
        ]
        generous = [
            min(top, max(n, pool.n_blocks + g))
            for n, pool, g, top in zip(least, pools, step, self.max_blocks, strict=True)
        ]
        return self._resize(generous) or (generous != least and self._resize(least))

    def _resize(self, sizes: list[int]) -> bool:
        """Pools to `sizes` (none smaller than now), making room under a budget first."""
        store, pools = self.store, self.blocks.pools
        grown = [p for p, n in enumerate(sizes) if n > pools[p].n_blocks]
        extra = store.layout.bytes([max(0, n - store.n_blocks[p]) for p, n in enumerate(sizes)])
        transient = max(store.resize_transient(sizes[p]) for p in grown)
        if self.budgeted and not self.residency.make_room(store.nbytes, extra + transient, store):
            return False
        done = []
        try:
            for p in grown:
                store.resize(p, sizes[p])
                done.append(p)
        except (OutOfBudget, torch.OutOfMemoryError):
            for p in done:
                store.resize(p, pools[p].n_blocks)
            return False
        for p in grown:
            pools[p].grow(sizes[p])
        self.growths += 1
        log.info("KV cache: pools grown to %s blocks", [pool.n_blocks for pool in pools])
        return True

    def max_kv_bytes(self) -> int | None:
        """The most KV bytes the device budget can ever give (None: no budget)."""
        return self.residency.kv_limit()

    def relieve(self) -> None:
        """At an idle safe point: shrink a budgeted engine's pools back towards their starting
        size (as far as their top blocks are free) and bring back the layers that fit again;
        compact the memory pool where fragmented."""
        if self.budgeted:
            for p, pool in enumerate(self.blocks.pools):
                size = max(self.base_blocks[p], pool.n_blocks - pool.top_free())
                if size < pool.n_blocks:
                    pool.shrink(size)
                    self.store.resize(p, size)
            self.residency.restore(self.store.nbytes, self.store)
        self.residency.compact(self.store)
