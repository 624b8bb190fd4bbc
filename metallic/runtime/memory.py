"""A typed memory pool: device memory per kind, sub-allocated from large arenas.

Every buffer the engine keeps (weights, KV cache, activations, staging) is a `Block`: a typed view
into an arena, a `torch.empty(n, dtype=uint8)` block that belongs to one kind. Allocations record
dtype, shape and element size (a raw quantized weight is uint8 bytes plus its ggml format name),
so the pool can say what it holds. Each arena keeps a sorted free list of (offset, size) ranges;
allocation is first-fit, offsets are aligned, a freed range merges with its free neighbours.

- Fragmentation of a kind is `1 - largest free range / free bytes`. `compact(kind)` slides live
  blocks to the lowest offsets (into earlier arenas where they fit), releases arenas left empty
  and bumps `generation`, so owners of CUDA graphs that captured addresses know to recapture. It
  runs only when asked (`maybe_compact` at a safe point), never behind a caller's back.
- An `exact` pool (the engine's, under a device budget) gives every block an arena of its own
  size, released the moment the block is freed. It then holds no byte the budget's plan does not
  count (no arena tails), and a part freed to make room (a layer moved to the host, a KV tensor
  replaced by a bigger one) goes back to torch's allocator at once (which the budget caps, so it
  is reused or handed back to the device), instead of waiting in an arena that only its own kind
  can reuse. Sub-allocation, fragmentation and compaction are for pools without it.
- A request the device cannot hold (after releasing empty arenas) raises `OutOfBudget`, a
  one-line error, not a CUDA out-of-memory trace, and leaves the pool as it was. The budget
  itself is the memory plan's (runtime/placement.py); the pool never moves blocks to make room.
- Metrics per kind and for the pool: current, peak and time-averaged live bytes (integrated over
  an injectable clock), reserved bytes and fragmentation.
- A block being filled carries a CUDA event: fills run on the pool's side stream, consumers make
  their stream wait on the event (`wait`), nobody synchronizes the device. On CPU fills are
  synchronous and there is no event.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from metallic.errors import MetallicError

KINDS = ("weights", "kv", "activations", "staging")


class OutOfBudget(MetallicError):
    """An allocation the device cannot hold, even after the pool released its empty arenas."""

    def __init__(self, kind: str, requested: int, in_use: int) -> None:
        super().__init__(
            f"{kind} needs {requested} more bytes but the device is full ({in_use} bytes held "
            "by the memory pool, none of them free)"
        )
        self.kind, self.requested, self.in_use = kind, requested, in_use


class Block:
    """One allocation: a typed view of arena bytes plus what it is, where it lives and whether
    its last write has finished. `compact` may move it: read `.tensor` again after a compaction."""

    def __init__(
        self,
        pool: MemoryPool,
        kind: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        quant: str | None,
        name: str,
    ) -> None:
        self._pool = pool
        self.kind, self.shape, self.dtype, self.quant, self.name = kind, shape, dtype, quant, name
        self.element_size = dtype.itemsize
        self.nbytes = math.prod(shape) * self.element_size
        self.size = 0  # bytes reserved in the arena (nbytes aligned up)
        self.arena = -1
        self.offset = 0
        self.tensor = torch.empty(0)
        self.event: torch.cuda.Event | None = None
        self.live = True

    def __repr__(self) -> str:
        fmt = self.quant or str(self.dtype).removeprefix("torch.")
        return (
            f"Block({self.name or '?'} {self.kind} {fmt}{list(self.shape)} "
            f"arena={self.arena} offset={self.offset})"
        )

    def fill_(self, value: float) -> Block:
        """Fill on the pool's side stream (CUDA) and record the event consumers wait on."""
        if self._pool.device.type != "cuda":
            self.tensor.fill_(value)
            return self
        stream = self._pool.side_stream()
        # The range may have been used by work still queued on the compute stream.
        stream.wait_stream(torch.cuda.current_stream(self._pool.device))
        with torch.cuda.stream(stream):
            self.tensor.fill_(value)
            event = torch.cuda.Event()
            event.record(stream)
        self.tensor.record_stream(stream)  # the allocator must not recycle it mid-fill
        self.event = event
        return self

    def zero_(self) -> Block:
        return self.fill_(0)

    def wait(self) -> None:
        """Make the current stream wait on the last write; the host never blocks."""
        if self.event is not None and self._pool.device.type == "cuda":
            torch.cuda.current_stream(self._pool.device).wait_event(self.event)

    @property
    def ready(self) -> bool:
        """Whether the last write has finished (always, without an event)."""
        return self.event is None or self.event.query()


class _Arena:
    def __init__(self, id: int, kind: str, data: torch.Tensor) -> None:
        self.id, self.kind, self.data = id, kind, data
        self.size = data.numel()
        self.free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), sorted by offset
        self.blocks: set[Block] = set()

    def take(self, need: int) -> int | None:
        """First fit: the offset of `need` bytes cut from the first free range that holds them."""
        for i, (offset, size) in enumerate(self.free):
            if size >= need:
                if size == need:
                    del self.free[i]
                else:
                    self.free[i] = (offset + need, size - need)
                return offset
        return None

    def give(self, offset: int, size: int) -> None:
        """Return a range, merged with the free ranges that touch it."""
        i = bisect.bisect(self.free, (offset, size))
        if i < len(self.free) and offset + size == self.free[i][0]:
            size += self.free.pop(i)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == offset:
            i -= 1
            offset, size = self.free[i][0], self.free[i][1] + size
            del self.free[i]
        self.free.insert(i, (offset, size))


class _Meter:
    """Current and peak bytes, and the integral of current bytes over time for the average."""

    def __init__(self, now: float) -> None:
        self.current = self.peak = 0
        self.area = 0.0
        self.start = self.last = now

    def add(self, delta: int, now: float) -> None:
        self.area += self.current * (now - self.last)
        self.last = now
        self.current += delta
        self.peak = max(self.peak, self.current)

    def average(self, now: float) -> float:
        elapsed = now - self.start
        area = self.area + self.current * (now - self.last)
        return area / elapsed if elapsed > 0 else float(self.current)


class MemoryPool:
    def __init__(
        self,
        device: torch.device | str,
        *,
        arena_bytes: int = 64 << 20,
        alignment: int = 256,
        compact_threshold: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        exact: bool = False,
    ) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise MetallicError(f"memory alignment must be a power of two, not {alignment}")
        self.device = torch.device(device)
        self.alignment = alignment
        self.arena_bytes = self._align(arena_bytes)
        self.compact_threshold = compact_threshold
        self.clock = clock
        self.exact = exact
        self.generation = 0  # bumped whenever blocks move: captured addresses are stale
        self.compactions = 0
        self.peak_reserved_bytes = 0
        self._arenas: dict[int, _Arena] = {}
        self._next_id = 0
        self._stream: torch.cuda.Stream | None = None
        now = clock()
        self._meters = {kind: _Meter(now) for kind in KINDS}
        self._total = _Meter(now)

    # -- allocation ------------------------------------------------------------------------------

    def allocate(
        self,
        kind: str,
        shape: Sequence[int] | int,
        dtype: torch.dtype,
        *,
        quant: str | None = None,
        name: str = "",
    ) -> Block:
        """A block of `shape` and `dtype` (raw quantized weights: uint8, (n_bytes,), quant=...)."""
        if kind not in KINDS:
            raise MetallicError(f"unknown memory kind {kind!r} (expected one of {KINDS})")
        shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
        block = Block(self, kind, shape, dtype, quant, name)
        if block.element_size > self.alignment:
            raise MetallicError(
                f"{dtype} needs more than the pool's {self.alignment}-byte alignment"
            )
        need = self._align(max(block.nbytes, 1))  # an empty block still gets its own range
        place = None if self.exact else self._first_fit(kind, need)
        if place is None:
            arena = self._new_arena(kind, need, block.nbytes)
            place = arena, arena.take(need)
        arena, offset = place
        assert offset is not None
        block.size = need
        self._place(block, arena, offset)
        self._count(kind, block.nbytes)
        return block

    def free(self, block: Block) -> None:
        """Return a block's range (an exact pool releases its arena); later work on the current
        stream waits for its pending write."""
        if block._pool is not self or not block.live:
            raise MetallicError(f"{block!r} was already freed (or belongs to another pool)")
        block.wait()
        block.live = False
        arena = self._arenas[block.arena]
        arena.blocks.discard(block)
        arena.give(block.offset, block.size)
        if self.exact:
            del self._arenas[arena.id]
        self._count(block.kind, -block.nbytes)

    def trim(self, kind: str | None = None) -> int:
        """Release arenas with nothing allocated (of `kind`, or all); returns the bytes released."""
        empty = [a for a in self._arenas.values() if not a.blocks and kind in (None, a.kind)]
        for arena in empty:
            del self._arenas[arena.id]
        return sum(a.size for a in empty)

    # -- fragmentation and compaction ------------------------------------------------------------

    def fragmentation(self, kind: str) -> float:
        ranges = [size for a in self._of(kind) for _, size in a.free]
        total = sum(ranges)
        return 1.0 - max(ranges) / total if total else 0.0

    def fragmented(self, kind: str) -> bool:
        """Whether `kind`'s fragmentation passed the compaction threshold."""
        return self.fragmentation(kind) > self.compact_threshold

    def maybe_compact(self, kind: str) -> int:
        """Compact `kind` if it is fragmented; call at a safe point."""
        return self.compact(kind) if self.fragmented(kind) else 0

    def compact(self, kind: str) -> int:
        """Slide live blocks of `kind` to the lowest offsets, copying bytes on the device; release
        arenas left empty. Returns the bytes moved; a move bumps `generation`."""
        moves, cursor = self._plan(kind)
        moved = 0
        for block, target, offset in moves:
            if target.id == block.arena and offset == block.offset:
                continue
            block.wait()  # a pending fill must land before its bytes are read
            src = self._arenas[block.arena].data[block.offset : block.offset + block.nbytes]
            dst = target.data[offset : offset + block.nbytes]
            if target.id == block.arena and offset + block.nbytes > block.offset:
                src = src.clone()  # overlapping slide within one arena
            dst.copy_(src)
            block.event = None  # the copy ran on the current stream: ordered for its consumers
            moved += block.nbytes
        for arena in self._of(kind):
            arena.blocks.clear()
            used = cursor[arena.id]
            arena.free = [(used, arena.size - used)] if used < arena.size else []
        for block, target, offset in moves:
            self._place(block, target, offset)
        self.trim(kind)
        if moved:
            self.generation += 1
            self.compactions += 1
        return moved

    # -- metrics ---------------------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        return sum(a.size for a in self._arenas.values())

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        kinds = {}
        for kind, meter in self._meters.items():
            arenas = self._of(kind)
            kinds[kind] = {
                "current_bytes": meter.current,
                "peak_bytes": meter.peak,
                "average_bytes": meter.average(now),
                "reserved_bytes": sum(a.size for a in arenas),
                "blocks": sum(len(a.blocks) for a in arenas),
                "arenas": len(arenas),
                "fragmentation": self.fragmentation(kind),
            }
        arenas = [
            {
                "id": a.id,
                "kind": a.kind,
                "size": a.size,
                "blocks": len(a.blocks),
                "used_bytes": sum(b.size for b in a.blocks),
                "free_bytes": sum(size for _, size in a.free),
                "largest_free": max((size for _, size in a.free), default=0),
            }
            for a in self._arenas.values()
        ]
        return {
            "kinds": kinds,
            "arenas": arenas,
            "current_bytes": self._total.current,
            "peak_bytes": self._total.peak,
            "average_bytes": self._total.average(now),
            "reserved_bytes": self.reserved_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "generation": self.generation,
            "compactions": self.compactions,
        }

    def side_stream(self) -> torch.cuda.Stream:
        """The stream fills run on, created on first use (CUDA only)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    # -- internals -------------------------------------------------------------------------------

    def _align(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def _of(self, kind: str) -> list[_Arena]:
        return [a for a in self._arenas.values() if a.kind == kind]  # dicts keep creation order

    def _first_fit(self, kind: str, need: int) -> tuple[_Arena, int] | None:
        for arena in self._of(kind):
            offset = arena.take(need)
            if offset is not None:
                return arena, offset
        return None

    def _place(self, block: Block, arena: _Arena, offset: int) -> None:
        block.arena, block.offset = arena.id, offset
        raw = arena.data[offset : offset + block.nbytes]
        block.tensor = raw.view(block.dtype).view(block.shape)
        arena.blocks.add(block)

    def _count(self, kind: str, delta: int) -> None:
        now = self.clock()
        self._meters[kind].add(delta, now)
        self._total.add(delta, now)

    def _new_arena(self, kind: str, need: int, requested: int) -> _Arena:
        """An arena of `arena_bytes` (or exactly `need` for a bigger block, or in an exact pool);
        a device out-of-memory, after releasing empty arenas, becomes `OutOfBudget`."""
        size = need if self.exact else max(need, self.arena_bytes)
        for attempt in range(2):
            try:
                data = torch.empty(size, dtype=torch.uint8, device=self.device)
                break
            except torch.cuda.OutOfMemoryError:
                if attempt or not self.trim():
                    raise OutOfBudget(kind, requested, self.reserved_bytes) from None
        arena = _Arena(self._next_id, kind, data)
        self._next_id += 1
        self._arenas[arena.id] = arena
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return arena

    def _plan(self, kind: str) -> tuple[list[tuple[Block, _Arena, int]], dict[int, int]]:
        """Where compaction puts each live block, and each arena's bytes in use after it. A block
        goes to the first arena, up to its own, with room at that arena's end; so every block
        lands at or before where it was and moving them in order never overwrites one unmoved."""
        arenas = self._of(kind)
        cursor = {a.id: 0 for a in arenas}
        moves = []
        for i, arena in enumerate(arenas):
            for block in sorted(arena.blocks, key=lambda b: b.offset):
                target = next(a for a in arenas[: i + 1] if cursor[a.id] + block.size <= a.size)
                moves.append((block, target, cursor[target.id]))
                cursor[target.id] += block.size
        return moves, cursor
