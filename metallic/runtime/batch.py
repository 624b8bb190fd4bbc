"""The metadata of one model step, built on the host and sent to the device in one copy.

A step is a flat batch of tokens from one or more sequences (prefill chunks and single decode
tokens, mixed freely). Everything the kernels index by (positions, sequence lengths, the block
tables) lives in a single int32 buffer, so a step costs one host-to-device transfer, and a
captured CUDA graph replays against a static buffer of the same layout refreshed by one `copy_`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SequenceChunk:
    """`tokens` of one sequence at positions `start ..`, with the sequence's block table in each
    KV pool (the physical block of every logical block `position // block_size`; entries below a
    sliding window are never read)."""

    start: int
    tokens: Sequence[int]
    tables: Sequence[Sequence[int]] = ()

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class StepBatch:
    packed: torch.Tensor  # int32: tokens | positions | seq_lens | cu_seqlens_q | last_rows | tables
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    seq_lens: torch.Tensor  # [B]: keys each sequence sees after this step
    cu_seqlens_q: torch.Tensor  # [B + 1]: sequence s owns token rows cu[s] .. cu[s+1]
    last_rows: torch.Tensor  # [B]: each sequence's last token row (whose logits sample)
    block_tables: tuple[torch.Tensor, ...]  # per KV pool [B, table_width]
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
        table_width: int = 0,
        max_q_len: int | None = None,
        max_keys: int = 0,
        upload: Callable[[np.ndarray], torch.Tensor] | None = None,
    ) -> StepBatch:
        """Pack `chunks` (each chunk's table rows padded to `table_width`, default the longest)
        into one buffer on `device`. `max_q_len` (default: the longest chunk) sizes the kernels'
        grids: a graph replayed for other splits of the same token count passes the token count.
        `max_keys` bounds the sequences' lengths (see the field); `upload` moves the packed
        int32 array to `device` (default: through freshly pinned memory)."""
        lengths = np.fromiter((len(c.tokens) for c in chunks), np.int64, len(chunks))
        starts = np.fromiter((c.start for c in chunks), np.int64, len(chunks))
        cu = np.zeros(len(chunks) + 1, np.int64)
        np.cumsum(lengths, out=cu[1:])
        n_tokens = int(cu[-1])
        tokens = np.fromiter((t for c in chunks for t in c.tokens), np.int64, n_tokens)
        # Token i of sequence s sits at position start[s] + (i - cu[s]).
        positions = np.repeat(starts - cu[:-1], lengths) + np.arange(n_tokens)
        n_pools = len(chunks[0].tables) if chunks else 0
        width = table_width or max((len(t) for c in chunks for t in c.tables), default=0)
        tables = np.zeros((n_pools, len(chunks), width), np.int64)
        for s, chunk in enumerate(chunks):
            for p, table in enumerate(chunk.tables):
                tables[p, s, : len(table)] = table
        flat = np.concatenate(
            (tokens, positions, starts + lengths, cu, cu[1:] - 1, tables.reshape(-1))
        )
        flat = flat.astype(np.int32)
        if upload is not None:
            packed = upload(flat)
        else:
            host = torch.from_numpy(flat)
            packed = (host.pin_memory() if device.type == "cuda" else host).to(
                device, non_blocking=True
            )
        return cls._views(
            packed,
            tuple(chunks),
            n_tokens,
            len(chunks),
            n_pools,
            width,
            max_q_len=max_q_len or int(lengths.max(initial=0)),
            max_position=int(positions.max(initial=0)),
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
        width: int,
        *,
        max_q_len: int,
        max_position: int,
        max_keys: int,
    ) -> StepBatch:
        sizes = [n_tokens, n_tokens, n_seqs, n_seqs + 1, n_seqs] + [n_seqs * width] * n_tables
        tokens, positions, seq_lens, cu, last, *tables = packed.split(sizes)
        return cls(
            packed,
            tokens,
            positions,
            seq_lens,
            cu,
            last,
            tuple(t.view(n_seqs, width) for t in tables),
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
        """Refresh this static batch in place from `other` (same layout; maybe built in this
        very buffer) for a graph replay."""
        if other.packed.data_ptr() != self.packed.data_ptr():
            self.packed.copy_(other.packed, non_blocking=True)
        self.chunks = other.chunks
        self.max_position = other.max_position
