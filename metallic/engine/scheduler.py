"""What each step computes: continuous batching with chunked prefill and preemption.

Sequences wait in arrival order and run in admission order. Each step has a token budget:

1. every running sequence that decodes gets its one token first, oldest first;
2. running sequences still prefilling get the next chunk of their prompt from what is left;
3. waiting sequences are admitted, first come first served, while the budget, the sequence limit
   and free KV blocks allow; each first claims its longest prefix from the prefix cache.

So a long prompt never stalls the sequences that decode: it shares steps with them, a chunk at a
time. A running sequence short of KV blocks first asks the planner to grow the pools; if that
cannot be done, the newest running sequence is preempted (its blocks go back, it waits at the
front of the queue and is recomputed later, mostly from the prefix cache) until the blocks are
there. A sequence that is alone and still cannot get its blocks can never run: it fails with a
one-line error, and the others go on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from metallic.engine.blocks import BlockManager
from metallic.engine.planner import KVPlanner
from metallic.engine.sequence import PENDING, Sequence, Status
from metallic.errors import MetallicError


class KVCacheTooSmall(MetallicError):
    """A sequence needs more KV-cache blocks than the device can ever give it."""


@dataclass
class Chunk:
    """Tokens [start, end) of `seq` computed in one step; samples when `end` is its length."""

    seq: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == len(self.seq.token_ids)


@dataclass
class Step:
    chunks: list[Chunk]
    failed: list[Sequence]  # sequences that can never get their blocks (finished as errors)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        planner: KVPlanner,
        max_num_seqs: int,
        max_step_tokens: int,
        max_chunk: int,
    ) -> None:
        """A step computes at most `max_step_tokens` tokens, at most `max_chunk` of one
        sequence, for at most `max_num_seqs` running sequences."""
        self.max_chunk = max_chunk
        self.blocks = blocks
        self.planner = planner
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest last
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        step = Step([], [])
        budget = self.max_step_tokens
        decoding = [s for s in self.running if not s.prefilling]
        for seq in decoding:  # oldest first; one whose last token ends it has nothing to do
            if seq.status is Status.RUNNING and seq.room() > 0 and self._reserve(seq, 1, step):
                step.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + 1))
                budget -= 1
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0 or seq.status is not Status.RUNNING:
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget, self.max_chunk)
            if self._reserve(seq, n, step):
                step.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] == PENDING:  # preempted mid-flight: wait for its last token
                break
            self.blocks.match_prefix(seq)
            n = min(len(seq.token_ids) - seq.num_computed, budget, self.max_chunk)
            if not self._admit(seq, n):
                self.blocks.release(seq)
                seq.num_computed = seq.num_cached = 0
                if not self.running:  # alone, and still no room: it never will have any
                    step.failed.append(self.waiting.popleft())
                    continue
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        return step

    def _admit(self, seq: Sequence, n: int) -> bool:
        start = seq.num_computed
        if self.blocks.reserve(seq, start, start + n):
            return True
        return self.planner.grow(self.blocks.missing(seq, start + n)) and self.blocks.reserve(
            seq, start, start + n
        )

    def _reserve(self, seq: Sequence, n: int, step: Step) -> bool:
        """Blocks for the next `n` tokens of running `seq`: from the free lists, from grown
        pools, or from the newest sequences, preempted. False if `seq` itself had to wait (it
        was the newest) or failed (it was alone)."""
        start = seq.num_computed
        while not self.blocks.reserve(seq, start, start + n):
            if self.planner.grow(self.blocks.missing(seq, start + n)):
                continue
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self.running.remove(seq)
                self.blocks.release(seq)
                step.failed.append(seq)
                return False
            self._preempt(victim, step)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, step: Step) -> None:
        """Send the newest running sequence back to wait, holding nothing; a chunk it already
        has in this step is withdrawn."""
        self.running.remove(seq)
        step.chunks = [c for c in step.chunks if c.seq is not seq]
        self.blocks.release(seq)
        seq.num_computed = seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
