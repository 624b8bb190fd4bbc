"""Which KV blocks each sequence holds: per-pool free lists, reference counts and a prefix cache.

Each KV pool (one per attention window, `models/kv_store.py`) has its own numbered blocks. A
sequence holds, per pool, a table from logical block (`position // block_size`) to physical block.

- Free blocks are handed out lowest id first, so the top of an idle pool empties and the planner
  can shrink it.
- Prefix cache: a full block whose keys are all computed gets a hash that chains the hash of the
  block before it with its own tokens, so equal hashes mean equal prefixes. A new sequence claims
  the cached blocks of its longest cached prefix (reference counts go up; nobody ever writes into
  a full block) and computes only the rest. A block whose last holder lets go keeps its hash and
  waits in an LRU list: it can still be claimed, and is evicted (its hash forgotten) only when a
  fresh block is wanted and no never-cached block is free.
- Sliding-window pools hand back a sequence's blocks as soon as every query to come sees past
  them; they are hashed first, so a prefix hit still finds the window before it. A prefix hit
  is the shortest over all pools: a windowed pool needs only the blocks of the window before the
  hit, a full-attention pool all of them.
- The first blocks of every pool are the scratch: the filler sequence that pads a batch to the
  token count of a captured graph writes its keys there, and no sequence reads them.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence as Seq

from metallic.engine.sequence import PENDING, Sequence
from metallic.models.kv_store import KVLayout


def chain_hash(previous: bytes, tokens: Seq[int]) -> bytes:
    """The identity of a full block: its tokens after the identity of the block before it."""
    data = b"".join(t.to_bytes(4, "little", signed=True) for t in tokens)
    return hashlib.blake2b(previous + data, digest_size=16).digest()


class BlockPool:
    """The numbered blocks of one KV pool: who holds each, and which are cached."""

    def __init__(self, window: int, n_blocks: int) -> None:
        self.window = window
        self.n_blocks = n_blocks
        self.refs = [0] * n_blocks
        self.free = list(range(n_blocks))  # a heap of free blocks with no hash: lowest first
        self.hash_of: dict[int, bytes] = {}  # cached block -> its hash
        self.block_of: dict[bytes, int] = {}  # hash -> cached block
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, unheld, oldest first

    @property
    def n_free(self) -> int:
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        return self.n_blocks - self.n_free

    def allocate(self) -> int:
        """A fresh block for one holder (the caller checked `n_free`)."""
        if self.free:
            block = heapq.heappop(self.free)
        else:
            block, _ = self.idle.popitem(last=False)  # evict the least recently used
            del self.block_of[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def claim(self, block: int) -> None:
        """One more holder of a cached block."""
        self.idle.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.idle[block] = None
            else:
                heapq.heappush(self.free, block)

    def cache(self, block: int, digest: bytes) -> None:
        """Remember a held, full block by its hash (first holder of equal blocks wins)."""
        if digest not in self.block_of and block not in self.hash_of:
            self.block_of[digest] = block
            self.hash_of[block] = digest

    def grow(self, n_blocks: int) -> None:
        for block in range(self.n_blocks, n_blocks):
            heapq.heappush(self.free, block)
        self.refs.extend([0] * (n_blocks - self.n_blocks))
        self.n_blocks = n_blocks

    def top_free(self) -> int:
        """How many of the highest blocks are unheld (the most a shrink can take)."""
        n = 0
        while n < self.n_blocks and self.refs[self.n_blocks - 1 - n] == 0:
            n += 1
        return n

    def shrink(self, n_blocks: int) -> None:
        """Drop the blocks from `n_blocks` up (all unheld; cached ones are forgotten)."""
        for block in range(n_blocks, self.n_blocks):
            if block in self.hash_of:
                del self.block_of[self.hash_of.pop(block)]
                del self.idle[block]
        self.free = [b for b in self.free if b < n_blocks]
        heapq.heapify(self.free)
        del self.refs[n_blocks:]
        self.n_blocks = n_blocks


class BlockManager:
    def __init__(
        self,
        layout: KVLayout,
        n_blocks: Seq[int],
        n_scratch: int,
        prefix_cache: bool = True,
    ) -> None:
        """Pools of `n_blocks[p]` blocks; the first `n_scratch` of each hold the filler's keys."""
        self.layout = layout
        self.block_size = layout.block_size
        self.prefix_cache = prefix_cache
        self.pools = [BlockPool(w, n) for w, n in zip(layout.windows, n_blocks, strict=True)]
        self.scratch_tables = [[pool.allocate() for _ in range(n_scratch)] for pool in self.pools]
        self.queries = self.looked_up = self.hits = 0  # lookups, their tokens, tokens found

    def missing(self, seq: Sequence, end: int) -> list[int]:
        """New blocks each pool must hand `seq` to hold positions up to `end`."""
        blocks = -(-end // self.block_size)
        return [max(0, blocks - len(table)) for table in seq.tables]

    def reserve(self, seq: Sequence, start: int, end: int) -> bool:
        """Blocks for a step of `seq` over positions [start, end): windowed pools first hand
        back what no query from `start` on can see. All or nothing: False when a pool lacks
        blocks (nothing is taken then)."""
        for p, pool in enumerate(self.pools):
            if pool.window:
                self._drop_below(seq, p, max(0, start - pool.window + 1) // self.block_size)
        need = self.missing(seq, end)
        if any(n > pool.n_free for n, pool in zip(need, self.pools, strict=True)):
            return False
        for n, pool, table in zip(need, self.pools, seq.tables, strict=True):
            table.extend(pool.allocate() for _ in range(n))
        return True

    def _drop_below(self, seq: Sequence, p: int, first: int) -> None:
        table, pool = seq.tables[p], self.pools[p]
        for logical in range(seq.first_live[p], min(first, len(table))):
            pool.release(table[logical])
            table[logical] = 0  # never read again: below every window to come
        seq.first_live[p] = max(seq.first_live[p], first)

    def release(self, seq: Sequence) -> None:
        """Hand back every block `seq` holds (cached ones stay claimable)."""
        for p, (pool, table) in enumerate(zip(self.pools, seq.tables, strict=True)):
            for block in reversed(table[seq.first_live[p] :]):
                pool.release(block)
        seq.reset_blocks(len(self.pools))

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` that its computed tokens filled since the last call. Called
        as soon as a step is queued: a later step that claims the blocks runs after it on the
        device. A block whose tokens are not all known yet (a sampled id still on the device)
        waits for the next call."""
        if not self.prefix_cache or seq.num_computed // self.block_size <= len(seq.block_hashes):
            return
        known = seq.num_computed
        for index in range(max(0, len(seq.token_ids) - 2), len(seq.token_ids)):
            if seq.token_ids[index] == PENDING:
                known = min(known, index)
                break
        full = known // self.block_size
        bs = self.block_size
        for logical in range(len(seq.block_hashes), full):
            previous = seq.block_hashes[-1] if seq.block_hashes else b""
            digest = chain_hash(previous, seq.token_ids[logical * bs : (logical + 1) * bs])
            seq.block_hashes.append(digest)
            for p, pool in enumerate(self.pools):
                if logical >= seq.first_live[p]:
                    pool.cache(seq.tables[p][logical], digest)

    def match_prefix(self, seq: Sequence) -> None:
        """Claim the cached blocks of the longest cached prefix of a sequence that holds none,
        and count them as computed. At least one token is always left to compute: its logits
        start the generation."""
        if not self.prefix_cache:
            return
        self.queries += 1
        self.looked_up += len(seq.token_ids)
        bs = self.block_size
        hashes: list[bytes] = []
        for logical in range((len(seq.token_ids) - 1) // bs):
            previous = hashes[-1] if hashes else b""
            hashes.append(chain_hash(previous, seq.token_ids[logical * bs : (logical + 1) * bs]))
        # A windowed pool's valid hits are not every length below its longest: settle on the
        # longest length that every pool serves.
        hit = len(hashes)
        while hit and (shortest := min(self._hit(pool, hashes, hit) for pool in self.pools)) < hit:
            hit = shortest
        if hit == 0:
            return
        for p, pool in enumerate(self.pools):
            first = max(0, hit * bs - pool.window + 1) // bs if pool.window else 0
            seq.first_live[p] = first
            seq.tables[p] = [0] * first
            for digest in hashes[first:hit]:
                block = pool.block_of[digest]
                pool.claim(block)
                seq.tables[p].append(block)
        seq.block_hashes = hashes[:hit]
        seq.num_computed = seq.num_cached = hit * bs
        self.hits += hit * bs

    def _hit(self, pool: BlockPool, hashes: list[bytes], limit: int) -> int:
        """Blocks of the longest prefix, at most `limit`, this pool can serve: every block before
        it (full attention), or the blocks of the window before it."""
        if not pool.window:
            n = 0
            while n < limit and hashes[n] in pool.block_of:
                n += 1
            return n
        for n in range(limit, 0, -1):
            first = max(0, n * self.block_size - pool.window + 1) // self.block_size
            if all(h in pool.block_of for h in hashes[first:n]):
                return n
        return 0

    def stats(self) -> list[dict[str, int]]:
        """Per pool: its window (0: full attention), blocks held, cached-and-unheld, in all."""
        return [
            {
                "window": pool.window,
                "blocks_used": pool.used,
                "blocks_cached": len(pool.idle),
                "blocks": pool.n_blocks,
            }
            for pool in self.pools
        ]
