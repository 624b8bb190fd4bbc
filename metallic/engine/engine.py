"""The generation engine: load a GGUF model, then prefill, decode, sample and stream text.

Runs one request at a time through a model step that already takes many sequences (flat token
batch + per-sequence slices), so continuous batching can later schedule several.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from metallic.engine.arguments import (
    PromptTooLong,  # noqa: F401 (callers catch it from this module)
    cap_context,
    check_kv_fits,
    check_load_options,
    check_prompt,
    fit_prompt,
)
from metallic.engine.detokenizer import StopMatcher, StreamingDetokenizer
from metallic.engine.sampling import Sampler, SamplingParams, top_logprobs
from metallic.errors import MetallicError
from metallic.gguf.config import ModelConfig, config_from_metadata
from metallic.gguf.default_model import DEFAULT_MODEL
from metallic.gguf.reader import open_gguf
from metallic.gguf.registry import resolve_model
from metallic.gguf.tokenizer import Tokenizer
from metallic.models.transformer import Transformer, step_memory_bound
from metallic.models.weights import (
    LayerWeights,
    ModelWeights,
    Part,
    estimate_bytes,
    formats,
    load_weights,
    tensors_of,
    with_tensors,
)
from metallic.ops.dispatch import use_kernels
from metallic.runtime.batch import SequenceChunk, StepBatch
from metallic.runtime.device import choose_device, choose_dtype, choose_vocab_dtype
from metallic.runtime.graphs import StepGraphs
from metallic.runtime.kv_cache import ContiguousKVCache, KVCache, PagedKVCache
from metallic.runtime.memory import Block, MemoryPool
from metallic.runtime.placement import MemoryPlan, ResidencyPolicy, parse_bytes, plan_memory
from metallic.runtime.staging import StagingRing
from metallic.runtime.streaming import LayerStreamer, PackedLayer, pack, packed_size

PREFILL_CHUNK = 512  # bounds the attention score matrix of long prompts
ARENA_BYTES = 32 << 20  # the memory pool's arena size (larger buffers get their own)
# Device bytes beside weights, KV cache and a step's activations (RoPE tables: the pool's
# activations kind; sampler buffers, graph outputs, cuBLAS workspaces): 8B Q4_K_M under a 2 GiB
# budget on an H100 peaked 82 MiB over a 32 MiB allowance (arena slack included, which a
# budgeted pool no longer has), so this is measured, with room.
RUNTIME_BYTES = 160 << 20

log = logging.getLogger("metallic")


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
        gpu_layers: int | None = None,
        memory_budget: int | str | None = None,
        context_override: bool = False,
    ) -> None:
        """On CUDA the Triton kernels run everything: weights stay in their GGUF blocks
        (`native`, default on), the KV cache is paged, and decode steps replay as CUDA graphs
        (`cuda_graphs`). Elsewhere weights are dequantized once at load into `dtype` and torch
        runs the ops (`native=True` there needs TRITON_INTERPRET=1: a testing mode).

        `gpu_layers` keeps only the first N layers on the device and streams the rest from the
        host; `memory_budget` (bytes, or text such as "2G") plans placement to fit it, KV cache
        included, and moves layers to the host when the KV cache outgrows what is left.

        `path` may name a known model (`metallic models`). `context_size` may not pass the
        model's training context unless `context_override`."""
        check_load_options(
            path,
            device=device,
            dtype=dtype,
            context_size=context_size,
            context_override=context_override,
            native=native,
            cuda_graphs=cuda_graphs,
            progress=progress,
            gpu_layers=gpu_layers,
            memory_budget=memory_budget,
        )
        self.path = resolve_model(path, DEFAULT_MODEL)
        self.gguf = open_gguf(self.path)
        self.config: ModelConfig = config_from_metadata(self.gguf.metadata, str(self.path))
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.device = choose_device(device)
        self.dtype = choose_dtype(self.device, dtype)
        kernels = use_kernels(self.device)
        native = kernels if native is None else native
        ctx = cap_context(context_size, self.config.context_length, context_override)
        # The CPU path keeps activations in f32: its f16 weights are widened for the products.
        act_dtype = self.dtype if kernels else torch.float32
        check_kv_fits(self.config, ctx, act_dtype, self.device)
        budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
        self.plan: MemoryPlan | None = None
        if gpu_layers is not None or budget is not None:
            fixed, per_layer = estimate_bytes(self.gguf, self.config, self.dtype, native)
            kv_full, kv_least = PagedKVCache.bytes_needed(
                self.config, 1, ctx, act_dtype, max_step_tokens=PREFILL_CHUNK
            )
            reserve = step_memory_bound(self.config, act_dtype, PREFILL_CHUNK, widen=native)
            reserve += RUNTIME_BYTES
            self.plan = plan_memory(
                per_layer, fixed, kv_full, kv_least, reserve, budget=budget, gpu_layers=gpu_layers
            )
            log.info("placement: %s", self.plan.describe())
        plan = self.plan
        self.staging = StagingRing(self.device)
        # The kernel path (and any placement) keeps device buffers in a typed pool: each layer
        # is one block of its bytes packed together, so nothing pays the allocator's rounding.
        # Under a budget the pool is exact: it holds only what the plan counts, and what the
        # residency manager frees leaves the device at once.
        pooled = kernels or plan is not None
        self.memory = (
            MemoryPool(self.device, arena_bytes=ARENA_BYTES, exact=budget is not None)
            if pooled
            else None
        )
        self.blocks: dict[str, Block] = {}  # the weights' pool blocks, by part name
        self.packed: dict[str, PackedLayer] = {}  # their layouts, to re-read a moved block
        self.slot_blocks: list[Block] = []
        weights = load_weights(
            self.gguf,
            self.config,
            self.device,
            self.dtype,
            progress,
            vocab_dtype=choose_vocab_dtype(self.device, self.dtype),
            native=native,
            staging=self.staging,
            on_host=lambda i: plan is not None and not plan.on_device[i],
            adopt=self._adopt,
        )
        self.model = Transformer(self.config, weights, self.device, act_dtype)
        self.host_layers: dict[int, PackedLayer] = {}
        for i in plan.host_layers if plan else ():
            self.host_layers[i] = self._pack_host(i)
        self._install_streamer()
        self.cache: KVCache
        if kernels or plan is not None:
            self.cache = PagedKVCache(
                self.config,
                1,
                ctx,
                self.device,
                act_dtype,  # the CPU path keeps its KV in f32, like the contiguous cache
                max_step_tokens=PREFILL_CHUNK,
                kv_bytes=plan.kv_bytes if plan and plan.budget is not None else None,
                memory=self.memory,
            )
        else:
            self.cache = ContiguousKVCache(self.config, 1, ctx, self.device)
        self.residency: ResidencyPolicy | None = None
        self.layer_moves = 0
        if plan is not None and plan.budget is not None:
            self.residency = ResidencyPolicy(plan)
            assert isinstance(self.cache, PagedKVCache)
            self.cache.grow_hook = self._make_room
        self.model.reserve_positions(ctx, self.memory)
        self.graphs: StepGraphs | None = None  # captured on first use
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if self.cuda_graphs:
            self._token_host = torch.empty(1, dtype=torch.long, pin_memory=True)
        self._graphs_key = (-1, -1, -1)
        self.sampler = Sampler(self.config.vocab_size, self.device, sorted(self.tokenizer.stop_ids))
        self.last_stats = GenerationStats()

    def _adopt(self, name: str, part: ModelWeights | LayerWeights) -> object:
        """Each part of the model as it loads: device parts move into pool blocks (host layers
        are packed into pinned memory once the model exists)."""
        if self.memory is None:
            return part
        layer = int(name.split(".")[1]) if isinstance(part, LayerWeights) else None
        if layer is not None and self.plan is not None and not self.plan.on_device[layer]:
            return part
        return self._to_pool(part, name)

    def _to_pool(self, part: Part, name: str, tensors: list[torch.Tensor] | None = None) -> Part:
        """`part` reading its `tensors` (default: its own) from one new pool block."""
        assert self.memory is not None
        tensors = tensors_of(part) if tensors is None else tensors
        size = packed_size(tensors)
        block = self.memory.allocate(
            "weights", (size,), torch.uint8, quant=formats(part), name=name
        )
        self.blocks[name] = block
        self.packed[name] = pack(tensors, self.device, out=block.tensor)
        return with_tensors(part, self.packed[name].tensors())

    def _pack_host(self, layer: int) -> PackedLayer:
        """Layer `layer`'s tensors in one host buffer (pinned for asynchronous copies)."""
        tensors = tensors_of(self.model.weights.layers[layer])
        return pack(tensors, torch.device("cpu"), pin=self.device.type == "cuda")

    def _slot(self, n_bytes: int, name: str) -> torch.Tensor:
        """A streaming slot: a pool block (host layers exist only under a plan, which pools)."""
        assert self.memory is not None
        block = self.memory.allocate("weights", (n_bytes,), torch.uint8, name=name)
        self.slot_blocks.append(block)
        return block.tensor

    def _free_slots(self) -> None:
        """Release the streaming slots (the streamer that reads them is about to be replaced)."""
        for block in self.slot_blocks:
            assert self.memory is not None
            self.memory.free(block)
        self.slot_blocks = []

    def _install_streamer(self) -> None:
        """Point every host layer at its streaming slot (a new streamer per set of layers)."""
        if not self.host_layers:
            self.model.streamer = None
            return
        streamer = LayerStreamer(self.device, self.host_layers, allocate=self._slot)
        layers = self.model.weights.layers
        for i in streamer.layers:
            layers[i] = with_tensors(layers[i], streamer.device_views(i))
        self.model.streamer = streamer

    def _move_layers(self, moved: list[int], to_host: bool) -> None:
        """Carry out a residency decision: the layers' bytes change sides, then the streamer and
        (through `layer_moves`) the captured graphs are rebuilt. The old slots go first and the
        new ones come last, so the device never holds more than before or after the move."""
        assert self.memory is not None  # a plan (and so residency) implies a pool
        self._synchronize()
        self._free_slots()  # nothing runs before the new streamer exists
        layers = self.model.weights.layers
        for i in moved:
            if to_host:
                self.host_layers[i] = self._pack_host(i)
                self.memory.free(self.blocks.pop(f"blk.{i}"))  # read from its slot from now on
                del self.packed[f"blk.{i}"]
            else:
                host = self.host_layers.pop(i)
                layers[i] = self._to_pool(layers[i], f"blk.{i}", host.tensors())
        self._install_streamer()
        self.layer_moves += len(moved)
        side = "host (streamed)" if to_host else "device"
        log.info("residency: moved layers %s to the %s", moved, side)
        self._compact()

    def _make_room(self, kv_extra: int, transient: int) -> None:
        """The KV cache is about to grow by `kv_extra` bytes, and to hold `transient` more while
        it copies a tensor: stream layers so that both fit the budget. The room stays free until
        the cache shrinks back, whose copy needs no more than one smaller tensor."""
        assert self.residency is not None
        moved = self.residency.make_room(self.cache.nbytes, kv_extra + transient)
        if moved:
            self._move_layers(moved, to_host=True)

    def _relieve(self) -> None:
        """After a run, a safe point: shrink the KV cache back (under a budget), compact the pool
        where fragmented, and return the layers that fit again."""
        shrunk = (
            self.residency is not None
            and isinstance(self.cache, PagedKVCache)
            and self.cache.shrink()
        )
        self._compact()
        if shrunk:
            assert self.residency is not None
            back = self.residency.restorable(self.cache.nbytes)
            if back:
                self._move_layers(back, to_host=False)

    def _compact(self) -> None:
        """At a safe point: compact the weights and KV kinds where fragmented (synchronized
        first, so no replay or copy in flight touches a block that moves), release empty
        arenas, and have the owners of moved blocks read them again; captured graphs see the
        new `memory.generation` and are recaptured."""
        memory = self.memory
        if memory is None:
            return
        kinds = ("weights", "kv")
        if any(memory.fragmented(kind) for kind in kinds):  # else no device sync is needed
            self._synchronize()
            generation = memory.generation
            for kind in kinds:
                memory.maybe_compact(kind)
            if memory.generation != generation:
                self._rebind()
        memory.trim()  # empty arenas go back to the device

    def _rebind(self) -> None:
        """Point the weights, the streaming slots and the KV cache at their moved blocks."""
        layers = self.model.weights.layers
        for name, block in self.blocks.items():
            self.packed[name] = replace(self.packed[name], buffer=block.tensor)
            tensors = self.packed[name].tensors()
            if name == "output":  # the non-layer weights; the layer list stays the same
                self.model.weights = with_tensors(self.model.weights, tensors)
            else:
                i = int(name.split(".")[1])
                layers[i] = with_tensors(layers[i], tensors)
        streamer = self.model.streamer
        if streamer is not None:
            streamer.slots = [block.tensor for block in self.slot_blocks]
            for i in streamer.layers:
                layers[i] = with_tensors(layers[i], streamer.device_views(i))
        if isinstance(self.cache, PagedKVCache):
            self.cache.rebind()

    def _replay(self, batch: StepBatch) -> torch.Tensor:
        """The step as a CUDA graph, captured again whenever addresses it baked in changed (the
        KV cache was resized, layers moved, or the memory pool compacted)."""
        key = (
            self.cache.generation if isinstance(self.cache, PagedKVCache) else 0,
            self.layer_moves,
            self.memory.generation if self.memory is not None else 0,
        )
        if self.graphs is None or key != self._graphs_key:
            self.graphs = StepGraphs(lambda b: self.model.forward(b, self.cache))
            self._graphs_key = key
        return self.graphs.run(batch)

    @property
    def context_size(self) -> int:
        return self.cache.context_size

    def stats(self) -> dict[str, object]:
        """Where memory went and how the last generation ran: device, weight and KV-cache
        bytes, the paged cache's block pools (blocks in use per window), the last run's speed."""
        kv_pools = self.cache.stats() if isinstance(self.cache, PagedKVCache) else []
        streamer = self.model.streamer
        placement = {
            "layers_on_device": self.config.n_layers - len(self.host_layers),
            "layers_streamed": len(self.host_layers),
            "host_bytes": streamer.host_bytes if streamer else 0,  # what every step copies
            "stream_slot_bytes": streamer.device_bytes if streamer else 0,
        }
        if self.residency is not None:
            placement |= {
                "budget_bytes": self.residency.budget,
                "evictions": self.residency.evictions,
                "restores": self.residency.restores,
            }
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weight_bytes": self._device_weight_bytes(),
            "kv_cache_bytes": self.cache.nbytes,
            "kv_pools": kv_pools,
            "placement": placement,
            "memory_pool": self.memory.stats() if self.memory is not None else None,
            "staging": self.staging.stats(),
            "last_run": vars(self.last_stats),
        }

    def _device_weight_bytes(self) -> int:
        """Weights held on the device: the pool's weight blocks (resident parts and streaming
        slots) when there is a pool, else every tensor of the model."""
        if self.memory is None:
            return self.model.weights.nbytes
        return self.memory.stats()["kinds"]["weights"]["current_bytes"]

    def encode_prompt(
        self, prompt: str | list[int], *, truncate: bool = False, max_tokens: int | None = None
    ) -> list[int]:
        check_prompt(prompt)
        ids = (
            self.tokenizer.encode(prompt, parse_special=True) if isinstance(prompt, str) else prompt
        )
        ids = fit_prompt(
            ids,
            self.context_size,
            truncate=truncate,
            max_tokens=max_tokens,
            bos_id=self.tokenizer.bos_id,
        )
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
            if not self.cuda_graphs or every_row:
                batch = self.cache.batch([chunk])
                rows.append(self.model.forward(batch, self.cache, every_row))
                continue
            assert isinstance(self.cache, PagedKVCache)  # graphs run on the kernel path only
            bucket = _graph_bucket(len(chunk.tokens))
            batch = self.cache.batch([chunk], pad_to=bucket)
            rows.append(self._replay(batch)[:1])  # row 0: this sequence (then the filler)
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
            self._relieve()

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
        return self._replay(batch)[:1]

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
        ids = self.encode_prompt(prompt, truncate=truncate, max_tokens=params.max_tokens)
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
                if self.cuda_graphs and not logprobs and ahead:
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
            self._relieve()

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
