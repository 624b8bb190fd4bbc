"""The generation engine: load a GGUF model, then prefill, decode, sample and stream text.

Runs one request at a time through a model step that already takes many sequences (flat token
batch + per-sequence slices), so continuous batching can later schedule several.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from metallic.engine.detokenizer import StopMatcher, StreamingDetokenizer
from metallic.engine.sampling import Sampler, SamplingParams, top_logprobs
from metallic.errors import MetallicError
from metallic.gguf.config import ModelConfig, config_from_metadata
from metallic.gguf.default_model import default_model_path
from metallic.gguf.reader import open_gguf
from metallic.gguf.tokenizer import Tokenizer
from metallic.models.transformer import Transformer
from metallic.models.weights import load_weights
from metallic.ops.dispatch import use_kernels
from metallic.runtime.batch import SequenceChunk
from metallic.runtime.device import choose_device, choose_dtype, choose_vocab_dtype
from metallic.runtime.graphs import StepGraphs
from metallic.runtime.kv_cache import ContiguousKVCache, KVCache, PagedKVCache
from metallic.runtime.staging import StagingRing

DEFAULT_CONTEXT = 4096
PREFILL_CHUNK = 512  # bounds the attention score matrix of long prompts


class PromptTooLong(MetallicError):
    """The prompt does not leave room for a single generated token in the context."""


@dataclass
class GeneratedToken:
    """One step's result: the chosen id, its text piece, and optionally the top log-probs."""

    token_id: int
    text: str
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.generated_tokens - 1, 0)  # the first token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    """A loaded model ready to generate; create it with `metallic.load`."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        context_size: int | None = None,
        native: bool | None = None,
        cuda_graphs: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """On CUDA the Triton kernels run everything: weights stay in their GGUF blocks
        (`native`, default on), the KV cache is paged, and decode steps replay as CUDA graphs
        (`cuda_graphs`). Elsewhere weights are dequantized once at load into `dtype` and torch
        runs the ops (`native=True` there needs TRITON_INTERPRET=1: a testing mode)."""
        self.path = Path(path) if path is not None else default_model_path()
        self.gguf = open_gguf(self.path)
        self.config: ModelConfig = config_from_metadata(self.gguf.metadata, str(self.path))
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.device = choose_device(device)
        self.dtype = choose_dtype(self.device, dtype)
        kernels = use_kernels(self.device)
        native = kernels if native is None else native
        self.staging = StagingRing(self.device)
        weights = load_weights(
            self.gguf,
            self.config,
            self.device,
            self.dtype,
            progress,
            vocab_dtype=choose_vocab_dtype(self.device, self.dtype),
            native=native,
            staging=self.staging,
        )
        # The CPU path keeps activations in f32: its f16 weights are widened for the products.
        act_dtype = self.dtype if kernels else torch.float32
        self.model = Transformer(self.config, weights, self.device, act_dtype)
        ctx = context_size or min(self.config.context_length, DEFAULT_CONTEXT)
        if ctx <= 1:
            raise MetallicError(f"context size must be at least 2, got {ctx}")
        self.cache: KVCache
        if kernels:
            self.cache = PagedKVCache(
                self.config, 1, ctx, self.device, self.dtype, max_step_tokens=PREFILL_CHUNK
            )
        else:
            self.cache = ContiguousKVCache(self.config, 1, ctx, self.device)
        self.model.reserve_positions(ctx)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = StepGraphs(lambda batch: self.model.forward(batch, self.cache))
            self._token_host = torch.empty(1, dtype=torch.long, pin_memory=True)
        self.sampler = Sampler(self.config.vocab_size, self.device, sorted(self.tokenizer.stop_ids))
        self.last_stats = GenerationStats()

    @property
    def context_size(self) -> int:
        return self.cache.context_size

    def stats(self) -> dict[str, object]:
        """Where memory went and how the last generation ran: device, weight and KV-cache
        bytes, the paged cache's block pools (blocks in use per window), the last run's speed."""
        kv_pools = self.cache.stats() if isinstance(self.cache, PagedKVCache) else []
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weight_bytes": self.model.weights.nbytes,
            "kv_cache_bytes": self.cache.nbytes,
            "kv_pools": kv_pools,
            "staging": self.staging.stats(),
            "last_run": vars(self.last_stats),
        }

    def encode_prompt(self, prompt: str | list[int], *, truncate: bool = False) -> list[int]:
        ids = (
            self.tokenizer.encode(prompt, parse_special=True) if isinstance(prompt, str) else prompt
        )
        room = self.context_size - 1
        if len(ids) > room:
            if not truncate:
                raise PromptTooLong(
                    f"the prompt has {len(ids)} tokens but the context holds {self.context_size}"
                    " (raise --ctx-size, or pass --truncate to keep the prompt's end)"
                )
            ids = ids[-room:]
        if not ids:
            raise MetallicError("the prompt is empty (and the model adds no BOS token)")
        self._check_ids(ids)
        return ids

    def _run(self, slot: int, tokens: list[int], start: int, *, every_row: bool) -> torch.Tensor:
        """Feed `tokens` at positions start.. in chunks; return the logits of every row [T, V]
        or of the last one only [1, V] (all a generation step needs)."""
        rows = []
        for offset in range(0, len(tokens), PREFILL_CHUNK):
            chunk = SequenceChunk(slot, start + offset, tokens[offset : offset + PREFILL_CHUNK])
            if self.graphs is None or every_row:
                batch = self.cache.batch([chunk])
                rows.append(self.model.forward(batch, self.cache, every_row))
                continue
            assert isinstance(self.cache, PagedKVCache)  # graphs run on the kernel path only
            bucket = _graph_bucket(len(chunk.tokens))
            batch = self.cache.batch([chunk], pad_to=bucket)
            rows.append(self.graphs.run(batch)[:1])  # row 0: this sequence (then the filler)
        return torch.cat(rows) if every_row else rows[-1]

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [len, vocab] of every position (for evaluation and tests)."""
        self._check_ids(token_ids)
        self.cache.check_room(len(token_ids))
        slot = self.cache.allocate()
        try:
            return self._run(slot, token_ids, 0, every_row=True)
        finally:
            self.cache.release(slot)

    def _fetch_later(self, chosen: torch.Tensor) -> torch.cuda.Event:
        """Start copying the sampled token to the host; `_fetched` waits for this copy alone."""
        self._token_host.copy_(chosen[:1], non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return copied

    def _fetched(self, copied: torch.cuda.Event) -> int:
        copied.synchronize()
        return int(self._token_host[0])

    def _decode_from_device(self, slot: int, chosen: torch.Tensor, position: int) -> torch.Tensor:
        """Queue the decode step of the token still on the device (its id goes from the sampler
        into the step's input on the GPU) and return its logits, valid once it runs."""
        batch = self.cache.batch([SequenceChunk(slot, position, [0])], pad_to=1)
        batch.tokens.copy_(chosen[:1])
        assert self.graphs is not None
        return self.graphs.run(batch)[:1]

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise MetallicError(
                f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}"
            )

    def generate_tokens(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        logprobs: int = 0,
        truncate: bool = False,
    ) -> Iterator[GeneratedToken]:
        """Yield each generated token with its text piece until EOS, a stop string or the limit."""
        params.validate()
        ids = self.encode_prompt(prompt, truncate=truncate)
        limit = params.max_tokens or self.context_size
        stats = GenerationStats(prompt_tokens=len(ids))
        self.last_stats = stats
        slot = self.cache.allocate()
        seq_id = slot
        self.sampler.add(seq_id, params, ids)
        detok = StreamingDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        try:
            began = time.perf_counter()
            logits = self._run(slot, ids, 0, every_row=False)
            self._synchronize()  # the timer stops when the logits exist, not when queued
            stats.prefill_seconds = time.perf_counter() - began
            began = time.perf_counter()
            position = len(ids)
            chosen = self.sampler.sample(logits, [seq_id])
            while True:
                # With graphs, the next step is queued before this token reaches the host: the
                # GPU computes it while the host detokenizes (wasted only when generation ends).
                queued = None
                ahead = position + 1 < self.context_size and stats.generated_tokens + 1 < limit
                if self.graphs is not None and not logprobs and ahead:
                    copied = self._fetch_later(chosen)
                    queued = self._decode_from_device(slot, chosen, position)
                    token = self._fetched(copied)
                else:
                    token = int(chosen[0])
                stats.generated_tokens += 1
                top = []
                if logprobs:
                    top_ids, top_lp = top_logprobs(logits, logprobs)
                    top = list(zip(top_ids[0].tolist(), top_lp[0].tolist(), strict=True))
                finish = ""
                if token in self.tokenizer.stop_ids and not params.ignore_eos:
                    text, finish = "", "stop"
                else:
                    text = stops.push(detok.push(token))
                    if stops.stopped:
                        finish = "stop"
                    elif stats.generated_tokens >= limit or position + 1 >= self.context_size:
                        finish = "length"
                if finish:
                    if not stops.stopped:  # release text held back for a possible stop string
                        text += stops.push(detok.flush()) + stops.flush()
                    stats.finish_reason = finish
                    yield GeneratedToken(token, text, top)
                    break
                yield GeneratedToken(token, text, top)
                if queued is None:
                    queued = self._run(slot, [token], position, every_row=False)
                logits = queued
                position += 1
                chosen = self.sampler.sample(logits, [seq_id])
            stats.decode_seconds = time.perf_counter() - began
        finally:
            self.sampler.remove(seq_id)
            self.cache.release(slot)

    def stream(
        self, prompt: str | list[int], max_tokens: int = 256, **sampling: object
    ) -> Iterator[str]:
        """Yield text pieces as they are generated (keyword arguments: `SamplingParams` fields)."""
        params = _params(max_tokens, sampling)
        for step in self.generate_tokens(prompt, params):
            if step.text:
                yield step.text

    def generate(self, prompt: str | list[int], max_tokens: int = 256, **sampling: object) -> str:
        """The whole completion of `prompt` as one string."""
        return "".join(self.stream(prompt, max_tokens, **sampling))


def _graph_bucket(n_tokens: int) -> int:
    """Token counts that get a captured graph: 1 (decode), then powers of two from 16 up to
    PREFILL_CHUNK. A prompt chunk is padded up to its bucket: at most 2x the tokens, against
    launch costs that exceed the whole prefill's GPU time on small models."""
    if n_tokens == 1:
        return 1
    return min(PREFILL_CHUNK, max(16, 1 << (n_tokens - 1).bit_length()))


def _params(max_tokens: int, sampling: dict[str, object]) -> SamplingParams:
    known = SamplingParams.__dataclass_fields__
    unknown = sorted(set(sampling) - set(known))
    if unknown:
        raise MetallicError(f"unknown sampling option(s): {', '.join(unknown)}")
    if "stop" in sampling and isinstance(sampling["stop"], (list, str)):
        stop = sampling["stop"]
        sampling = {**sampling, "stop": (stop,) if isinstance(stop, str) else tuple(stop)}
    return replace(SamplingParams(), max_tokens=max_tokens, **sampling)  # type: ignore[arg-type]


def load(path: str | Path | None = None, **options: object) -> Engine:
    """Open a GGUF model (default: Gemma 3 270M Q4_K_M) and return a ready `Engine`."""
    return Engine(path, **options)  # type: ignore[arg-type]
