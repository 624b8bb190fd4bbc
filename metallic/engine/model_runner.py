"""Scheduled work in, sampled tokens out: one step batch, one forward, one sampling pass.

The runner turns a scheduled step into a `StepBatch` (the tokens of every sequence flattened, with
positions, block tables and lengths), runs the model on it and samples every sequence that ends
its chunk, each with its own parameters, in one batched pass. Nothing here waits for the device:
the sampled ids stay on it, and a copy to pinned host memory is queued with an event, so the
engine can queue the next step before it reads them (a decode input whose id is still on the
device is filled in there from the previous step's tensor).

On CUDA, steps replay as graphs: decode steps padded to a power-of-two number of sequences and
captured per key-count bound, single prompt chunks padded to a bucket of tokens. Padding rows are
a filler sequence that writes its keys into the scratch blocks. Mixed steps (several prompts, or
prompts beside decodes) run eagerly. A graph is captured on first use with a log line (so a run
captures only the shapes it runs: `metallic run` one prompt bucket and one decode graph), and
again when anything it baked in moved (the KV pools were resized, layers moved, the pool
compacted).

Under a device budget prompt chunks run eagerly, still padded to their bucket (the same kernels,
so the same numbers): a captured chunk would keep its activations in the graphs' memory pool,
beside the eager steps' own in torch's cache, and the budget would pay for a step twice. A step
that the budget cannot hold fails with a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch

from metallic.engine.blocks import BlockManager
from metallic.engine.sampling import Sampler
from metallic.engine.scheduler import Chunk, Step
from metallic.engine.sequence import PENDING, Sequence
from metallic.errors import MetallicError
from metallic.models.kv_store import KVStore
from metallic.models.transformer import Transformer
from metallic.runtime.batch import SequenceChunk, StepBatch
from metallic.runtime.graphs import StepGraphs
from metallic.runtime.kernel_cache import CompileNotice, compile_ahead
from metallic.runtime.transfer import PinnedRing

MIN_KEY_BOUND = 256  # the smallest key-count bound of a step (see key_bound)

log = logging.getLogger("metallic")


class StepOutOfMemory(MetallicError):
    """A step needed more device memory than the budget leaves torch."""


@contextmanager
def _device_memory_errors() -> Iterator[None]:
    """torch's out-of-memory error (a device budget caps its allocator) as a one-line error."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise StepOutOfMemory(
            "a step needed more device memory than the device budget leaves it (raise "
            "--gpu-memory, or run fewer sequences or shorter prompts at once)"
        ) from None


def decode_graph_rows(n_seqs: int, context_size: int) -> int:
    """Logit rows that captured decode graphs keep as their outputs, for steps of up to
    `n_seqs` sequences: a graph per power-of-two batch and per key-count bound (see
    `ModelRunner.key_bound`), each holding a row per sequence of its batch."""
    bounds, bound = 1, MIN_KEY_BOUND
    while bound < context_size:
        bound *= 2
        bounds += 1
    return bounds * (2 * (1 << (n_seqs - 1).bit_length()) - 1)


@dataclass
class Launched:
    """A step queued on the device: what it computes and where its sampled ids will be."""

    step: Step
    sampled: list[tuple[Sequence, int]]  # (sequence, index of its PENDING token), in row order
    tokens: torch.Tensor  # [len(sampled)] int64 on the device
    host: torch.Tensor  # the same ids (and logprobs), landing in (pinned) host memory
    ready: torch.cuda.Event | None
    logprob_rows: list[int] = field(default_factory=list)  # rows in `sampled` with logprobs
    top_k: int = 0

    def fetch(self) -> tuple[list[int], list[list[float]]]:
        """Wait for the ids (and the logprobs: chosen first, then the top ids and their
        values) to reach the host."""
        if self.ready is not None:
            self.ready.synchronize()
        n = len(self.sampled)
        ids = self.host[:n].long().tolist()
        rows = len(self.logprob_rows)
        return ids, self.host[n:].view(rows, -1).tolist() if rows else []


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        store: KVStore,
        blocks: BlockManager,
        sampler: Sampler,
        context_size: int,
        prefill_bucket: Callable[[int], int],
        cuda_graphs: bool,
        version: Callable[[], object],
        uploads: PinnedRing,
        budgeted: bool = False,
    ) -> None:
        """`prefill_bucket(n)`: the token count a captured prompt chunk of n tokens is padded
        to; `version()`: changes when weights moved (graphs recapture); `uploads`: the pinned
        buffers of per-step uploads (shared with the sampler); `budgeted`: a device budget
        holds the process (prompt chunks run eagerly)."""
        self.model = model
        self.store = store
        self.blocks = blocks
        self.sampler = sampler
        self.device = model.device
        self.context_size = context_size
        self.prefill_bucket = prefill_bucket
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.version = version
        self.uploads = uploads
        self.budgeted = budgeted
        self.downloads = PinnedRing(self.device)
        self.graphs: StepGraphs | None = None
        self._graphs_key: object = None
        self.steps = 0
        # Says on stderr when kernels compile (on a first run before they do), until the first
        # decode step has run: by then a run has compiled what it needs.
        self.compile_notice = CompileNotice.for_device(self.device)

    def key_bound(self, n_keys: int) -> int:
        """The power of two from MIN_KEY_BOUND up (at most the context) that holds `n_keys`:
        few bounds, so few decode graphs, yet a short context is not split as a full one."""
        bound = MIN_KEY_BOUND
        while bound < n_keys:
            bound *= 2
        return min(bound, self.context_size)

    def launch(self, step: Step, previous: Launched | None) -> Launched:
        """Queue `step` on the device: batch, forward, sampling, and the copy of the ids."""
        rows = [i for i, c in enumerate(step.chunks) if c.samples]
        sampled = [(step.chunks[i].seq, len(step.chunks[i].seq.token_ids)) for i in rows]
        logprob_rows = [i for i, (seq, _) in enumerate(sampled) if seq.logprobs is not None]
        top_k = max((sampled[i][0].logprobs or 0 for i in logprob_rows), default=0)
        with _device_memory_errors():
            batch, graphed = self.prepare(step.chunks, previous)
            logits = self.execute(batch, graphed)
            if self.compile_notice is not None and all(c.end - c.start == 1 for c in step.chunks):
                self.compile_notice.finish()
                self.compile_notice = None
            if len(rows) != logits.shape[0]:  # filler rows, or chunks that do not sample yet
                logits = logits[self.uploads.upload(rows)]
            seq_ids = [seq.seq_id for seq, _ in sampled]
            if not rows:
                tokens = logits.new_empty(0).long()
            else:  # log-probabilities are of the raw logits: those keep them unmasked
                tokens = self.sampler.sample(logits, seq_ids, in_place=not logprob_rows)
            if logprob_rows:  # ids and log-probabilities travel in one copy
                logprobs = self._logprobs(logits, tokens, logprob_rows, top_k).reshape(-1)
                host, ready = self.downloads.download(torch.cat((tokens.double(), logprobs)))
            else:
                host, ready = self.downloads.download(tokens)
        for row, (seq, index) in enumerate(sampled):
            seq.token_ids.append(PENDING)
            seq.pending_row = row
            assert len(seq.token_ids) == index + 1
        for chunk in step.chunks:
            chunk.seq.num_computed = chunk.end
        self.steps += 1
        return Launched(step, sampled, tokens, host, ready, logprob_rows, top_k)

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], k: int
    ) -> torch.Tensor:
        """Per row: the chosen token's log-probability under the raw logits, then the `k` most
        likely ids and their log-probabilities: [len(rows), 1 + 2k]."""
        index = self.uploads.upload(rows)
        logprobs = torch.log_softmax(logits[index].float(), dim=-1)
        chosen = logprobs.gather(1, tokens[index][:, None])
        values, ids = logprobs.topk(k, dim=-1) if k else (chosen[:, :0], chosen[:, :0])
        return torch.cat((chosen.double(), ids.double(), values.double()), dim=1)

    def prepare(self, chunks: list[Chunk], previous: Launched | None) -> tuple[StepBatch, bool]:
        """The step batch of `chunks` (padded for a graph when one serves it), and whether a
        graph does. Inputs still on the device come from `previous`'s sampled ids."""
        seq_chunks = []
        fill_rows, fill_from = [], []
        row = 0
        for chunk in chunks:
            seq = chunk.seq
            tokens = seq.token_ids[chunk.start : chunk.end]
            if tokens[-1] == PENDING:
                assert previous is not None and len(tokens) == 1
                tokens = [0]
                fill_rows.append(row)
                fill_from.append(seq.pending_row)
            seq_chunks.append(SequenceChunk(chunk.start, tokens, seq.tables))
            row += len(tokens)
        longest = max(c.end for c in chunks)
        bound = self.key_bound(longest)
        bs = self.blocks.block_size
        graphed = self.cuda_graphs
        width, pad_to = 0, 0
        if graphed and all(c.end - c.start == 1 for c in chunks):
            n = 1 << (len(chunks) - 1).bit_length()  # sequences, padded to a power of two
            scratch = [t[:1] for t in self.blocks.scratch_tables]
            seq_chunks += [SequenceChunk(0, [0], scratch)] * (n - len(chunks))
            width = -(-bound // bs)
        elif graphed and len(chunks) == 1:
            pad_to = self.prefill_bucket(len(seq_chunks[0].tokens))
            filler = pad_to - len(seq_chunks[0].tokens)
            if filler:
                scratch = [t[: -(-filler // bs)] for t in self.blocks.scratch_tables]
                seq_chunks.append(SequenceChunk(0, [0] * filler, scratch))
            width = -(-self.context_size // bs)
            bound = 0  # a prompt chunk's graph serves every context length
            graphed = not self.budgeted  # padded all the same: the kernels of the graph
        else:
            graphed = False
        upload = self.uploads.upload
        if graphed:  # a captured graph's own input takes the step's metadata: no copy to it
            n_tokens = sum(len(c.tokens) for c in seq_chunks)
            static = self._step_graphs().inputs((n_tokens, len(seq_chunks), bound))
            if static is not None:
                upload = partial(self.uploads.upload, out=static.packed)
        batch = StepBatch.build(
            seq_chunks,
            self.device,
            width,
            max_q_len=pad_to or None,
            max_keys=bound,
            upload=upload,
        )
        if fill_rows:
            self._fill(batch, fill_rows, fill_from, previous)
        return batch, graphed

    def _fill(
        self, batch: StepBatch, rows: list[int], sources: list[int], previous: Launched | None
    ) -> None:
        """Write decode inputs whose ids are still on the device (previous step's samples)."""
        assert previous is not None
        source = previous.tokens
        if rows == sources == list(range(len(rows))):  # one launch, converting to int32
            batch.tokens[: len(rows)].copy_(source[: len(rows)])
            return
        index = self.uploads.upload(sources)
        at = self.uploads.upload(rows)
        batch.tokens.index_copy_(0, at, source.index_select(0, index).to(torch.int32))

    def execute(self, batch: StepBatch, graphed: bool) -> torch.Tensor:
        """Logits [sequences (filler included), vocab] of each sequence's last token."""
        notice = self.compile_notice
        streams = self.budgeted or self.model.streamer is not None
        if notice is not None and notice.first_run and not streams:
            # The kernels of this step, compiled in parallel before the step meets them one by
            # one (not where layers stream from the host: not worth moving them twice for this).
            compile_ahead(lambda: self.model.forward(batch, self.store))
        if not graphed:
            return self.model.forward(batch, self.store)
        logits = self._step_graphs().run(batch)
        self.model.profiler.replayed(logits, batch)
        return logits

    def _step_graphs(self) -> StepGraphs:
        """The captured graphs, new ones when anything they baked in moved."""
        # A profiler's timing events are part of the graphs captured while it is attached.
        key = (self.store.generation, self.version(), self.model.profiler)
        if self.graphs is None or key != self._graphs_key:
            self.graphs = StepGraphs(
                lambda b: self.model.forward(b, self.store), release_cache=self.budgeted
            )
            self._graphs_key = key
        return self.graphs

    def forward_chunk(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Logits [end - start, vocab] of every token of `seq` in [start, end), run eagerly
        (teacher forcing); the sequence holds the blocks."""
        chunk = SequenceChunk(start, seq.token_ids[start:end], seq.tables)
        batch = StepBatch.build([chunk], self.device, max_keys=self.key_bound(end))
        with _device_memory_errors():
            return self.model.forward(batch, self.store, every_row=True)
