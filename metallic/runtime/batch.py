"""The metadata of one model step, built on the host and sent to the device in one copy.

A step is a flat batch of tokens from one or more sequences (a prefill chunk or one decode token
each). Everything the kernels index by (positions, sequence lengths, the block table) lives in a
single int32 buffer, so a step costs one host-to-device transfer, and a captured CUDA graph
replays against a static buffer of the same layout refreshed by one `copy_`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceChunk:
    """`tokens` of the sequence in KV slot `slot`, at positions `start ..`."""

    slot: int
    start: int
    tokens: Sequence[int]


@dataclass
class StepBatch:
    packed: torch.Tensor  # int32: tokens | positions | seq_lens | cu_seqlens_q | last_rows | tables
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    seq_lens: torch.Tensor  # [B]: keys each sequence sees after this step
    cu_seqlens_q: torch.Tensor  # [B + 1]: sequence s owns token rows cu[s] .. cu[s+1]
    last_rows: torch.Tensor  # [B]: each sequence's last token row (whose logits sample)
    block_tables: tuple[torch.Tensor, ...]  # per block pool [B, max_blocks] (paged caches only)
    chunks: tuple[SequenceChunk, ...]  # the host's view of the same step
    max_q_len: int
    max_position: int
    # A bound on every sequence's key count after this step (0: none given); decode graphs are
    # captured per bound, so a short context splits its attention over few programs.
    max_keys: int = 0

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def decode(self) -> bool:
        """One token per sequence: the attention kernels take their decode path."""
        return self.max_q_len == 1

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        device: torch.device,
        tables: Sequence[Sequence[Sequence[int]]] = (),
        max_blocks: int = 0,
        max_q_len: int | None = None,
        max_keys: int = 0,
    ) -> StepBatch:
        """Pack `chunks` (and, for a paged cache, per block pool each chunk's table row padded
        to `max_blocks`) into one buffer on `device`. `max_q_len` (default: the longest chunk)
        sizes the kernels' grids: a graph replayed for other splits of the same token count
        passes the token count. `max_keys` bounds the sequences' lengths (see the field)."""
        tokens: list[int] = []
        positions: list[int] = []
        seq_lens, cu, last = [], [0], []
        for chunk in chunks:
            n = len(chunk.tokens)
            tokens.extend(chunk.tokens)
            positions.extend(range(chunk.start, chunk.start + n))
            seq_lens.append(chunk.start + n)
            last.append(cu[-1] + n - 1)
            cu.append(cu[-1] + n)
        flat: list[int] = []
        for rows in tables:
            for row in rows:
                flat.extend(row)
                flat.extend([0] * (max_blocks - len(row)))
        host = torch.tensor(tokens + positions + seq_lens + cu + last + flat, dtype=torch.int32)
        if device.type == "cuda":
            host = host.pin_memory()
        packed = host.to(device, non_blocking=True)
        return cls._views(
            packed,
            tuple(chunks),
            len(tokens),
            len(chunks),
            len(tables),
            max_blocks,
            max_q_len=max_q_len or max((len(c.tokens) for c in chunks), default=0),
            max_position=max(positions, default=0),
            max_keys=max_keys,
        )

    @classmethod
    def _views(
        cls,
        packed: torch.Tensor,
        chunks: tuple[SequenceChunk, ...],
        n_tokens: int,
        n_seqs: int,
        n_tables: int,
        max_blocks: int,
        *,
        max_q_len: int,
        max_position: int,
        max_keys: int,
    ) -> StepBatch:
        sizes = [n_tokens, n_tokens, n_seqs, n_seqs + 1, n_seqs] + [n_seqs * max_blocks] * n_tables
        tokens, positions, seq_lens, cu, last, *tables = packed.split(sizes)
        return cls(
            packed,
            tokens,
            positions,
            seq_lens,
            cu,
            last,
            tuple(t.view(n_seqs, max_blocks) for t in tables),
            chunks,
            max_q_len,
            max_position,
            max_keys,
        )

    def static_copy(self) -> StepBatch:
        """A batch of the same layout in its own buffer: the input of a captured graph."""
        return self._views(
            self.packed.clone(),
            self.chunks,
            self.n_tokens,
            len(self.chunks),
            len(self.block_tables),
            self.block_tables[0].shape[1] if self.block_tables else 0,
            max_q_len=self.max_q_len,
            max_position=self.max_position,
            max_keys=self.max_keys,
        )

    def load(self, other: StepBatch) -> None:
        """Refresh this static batch in place from `other` (same layout) for a graph replay."""
        self.packed.copy_(other.packed, non_blocking=True)
        self.chunks = other.chunks
        self.max_position = other.max_position
