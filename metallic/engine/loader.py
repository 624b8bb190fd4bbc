"""A GGUF file made ready to run: config, tokenizer, device, memory plan, pool and weights.

Loading streams each layer from the memory-mapped file to where the plan puts it (the device,
through the pinned staging ring, into one memory-pool block per layer; or pinned host memory, to
be streamed), so at most one layer exists twice at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from metallic.engine.arguments import cap_context, check_kv_fits
from metallic.engine.residency import Residency
from metallic.gguf.config import ModelConfig
from metallic.gguf.default_model import DEFAULT_MODEL
from metallic.gguf.reader import GGUFFile, open_gguf
from metallic.gguf.registry import resolve_model
from metallic.gguf.tokenizer import Tokenizer
from metallic.models.kv_store import KVLayout
from metallic.models.transformer import Transformer, step_memory_bound
from metallic.models.validate import model_config
from metallic.models.weights import estimate_bytes, load_weights
from metallic.ops.dispatch import use_kernels
from metallic.runtime.budget import budget_overhead
from metallic.runtime.device import choose_device, choose_dtype, choose_vocab_dtype
from metallic.runtime.memory import MemoryPool
from metallic.runtime.placement import MemoryPlan, parse_bytes, plan_memory
from metallic.runtime.staging import StagingRing
from metallic.runtime.warmup import start_gpu_warmup

ARENA_BYTES = 32 << 20  # the memory pool's arena size (larger buffers get their own)
# Device bytes beside weights, KV cache and a step's activations (RoPE tables: the pool's
# activations kind; sampler buffers, graph outputs, cuBLAS workspaces): 8B Q4_K_M under a 2 GiB
# budget on an H100 peaked 82 MiB over a 32 MiB allowance (arena slack included, which a
# budgeted pool no longer has), so this is measured, with room.
RUNTIME_BYTES = 160 << 20

log = logging.getLogger("metallic")


@dataclass(frozen=True)
class KVSizes:
    """Blocks per KV pool: one sequence's worth, the scratch, and what a plan starts with."""

    per_sequence: list[int]  # the most one sequence holds at the full context
    scratch: int  # blocks the filler of padded batches writes (in every pool)

    def start(self) -> list[int]:
        return [n + self.scratch for n in self.per_sequence]

    def most(self, n_seqs: int) -> list[int]:
        return [n_seqs * n + self.scratch for n in self.per_sequence]

    def least(self, layout: KVLayout, step_tokens: int) -> list[int]:
        """What a budget must give: windowed pools whole, full-attention pools one step."""
        step = -(-step_tokens // layout.block_size)
        return [
            n + self.scratch if w else min(n, step) + self.scratch
            for w, n in zip(layout.windows, self.per_sequence, strict=True)
        ]


def kv_sizes(layout: KVLayout, context: int, step_tokens: int) -> KVSizes:
    """A sequence holds its whole context, or on a windowed pool its window and one step."""
    bs = layout.block_size
    per_seq = []
    for window in layout.windows:
        blocks = -(-context // bs)
        if window:
            blocks = min(blocks, -(-(window - 1 + step_tokens) // bs) + 1)
        per_seq.append(blocks)
    return KVSizes(per_seq, min(max(per_seq), -(-step_tokens // bs)))


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype  # of weights the kernels do not read natively
    act_dtype: torch.dtype  # of activations and the KV cache
    plan: MemoryPlan | None
    memory: MemoryPool | None
    staging: StagingRing
    residency: Residency
    model: Transformer
    context_size: int  # the most tokens of one sequence
    layout: KVLayout
    kv_sizes: KVSizes
    kv_start: list[int]  # blocks per pool the KV cache starts with


def load_model(
    path: str | Path | None,
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    context_size: int | None,
    context_override: bool,
    step_tokens: int,
    n_seqs: int,
    native: bool | None,
    progress: Callable[[int, int], None] | None,
    gpu_layers: int | None,
    memory_budget: int | str | None,
) -> LoadedModel:
    """On CUDA the Triton kernels run everything and weights stay in their GGUF blocks
    (`native`, default on); elsewhere weights are dequantized once into `dtype` and torch runs
    the ops (`native=True` there needs TRITON_INTERPRET=1: a testing mode). `gpu_layers` /
    `memory_budget` plan which layers stay on the device (see runtime/placement.py); a step
    computes at most `step_tokens` tokens of at most `n_seqs` sequences. `path` may name a
    known model; the context defaults to the model's, at most 4096, and may pass it only with
    `context_override`."""
    path = resolve_model(path, DEFAULT_MODEL)
    gguf = open_gguf(path)
    config = model_config(gguf)
    device = choose_device(device)
    warmup = start_gpu_warmup(device)  # overlaps the tokenizer and the weights
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    dtype = choose_dtype(device, dtype)
    kernels = use_kernels(device)
    native = kernels if native is None else native
    context_size = cap_context(context_size, config.context_length, context_override)
    # The CPU path keeps activations in f32: its f16 weights are widened for the products.
    act_dtype = dtype if kernels else torch.float32
    check_kv_fits(config, context_size, act_dtype, device)
    layout = KVLayout.of(config, act_dtype)
    sizes = kv_sizes(layout, context_size, step_tokens)
    kv_start = sizes.start()
    budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
    plan = None
    if gpu_layers is not None or budget is not None:
        fixed, per_layer = estimate_bytes(gguf, config, dtype, native)
        reserve = step_memory_bound(config, act_dtype, step_tokens, n_seqs, widen=native)
        reserve += budget_overhead(device, budget)  # the CUDA context, libraries, modules
        full, least = layout.bytes(kv_start), layout.bytes(sizes.least(layout, step_tokens))
        plan = plan_memory(
            per_layer, fixed, full, least, reserve + RUNTIME_BYTES, budget=budget,
            gpu_layers=gpu_layers,
        )  # fmt: skip
        log.info("placement: %s", plan.describe())
        if budget is not None:
            kv_start = _budgeted_start(layout, kv_start, sizes, step_tokens, plan.kv_bytes)
    staging = StagingRing(device)
    # The kernel path (and any placement) keeps device buffers in a typed pool: each layer is
    # one block of its bytes packed together, so nothing pays the allocator's rounding. Under a
    # budget the pool is exact: it holds only what the plan counts, and what the residency
    # manager frees leaves the device at once.
    pooled = kernels or plan is not None
    memory = (
        MemoryPool(device, arena_bytes=ARENA_BYTES, exact=budget is not None) if pooled else None
    )
    residency = Residency(device, memory, plan)
    weights = load_weights(
        gguf,
        config,
        device,
        dtype,
        progress,
        vocab_dtype=choose_vocab_dtype(device, dtype),
        native=native,
        staging=staging,
        on_host=residency.on_host,
        adopt=residency.adopt,
    )
    model = Transformer(config, weights, device, act_dtype)
    residency.install(model)
    model.reserve_positions(context_size, memory)
    if warmup is not None:
        warmup.join()
    return LoadedModel(
        path, gguf, config, tokenizer, device, dtype, act_dtype, plan, memory, staging,
        residency, model, context_size, layout, sizes, kv_start,
    )  # fmt: skip


def _budgeted_start(
    layout: KVLayout, start: list[int], sizes: KVSizes, step_tokens: int, kv_bytes: int
) -> list[int]:
    """Blocks per pool within `kv_bytes`: windowed pools whole, full-attention pools what is
    left (at least one step's worth, at most one sequence at the full context)."""
    least = sizes.least(layout, step_tokens)
    blocks = list(start)
    if 0 in layout.windows:
        full = layout.windows.index(0)
        rest = kv_bytes - layout.bytes([0 if p == full else n for p, n in enumerate(start)])
        fit = rest // layout.pool_block_bytes(full)
        blocks[full] = min(start[full], max(least[full], fit))
    return blocks
