"""A GGUF file made ready to run: config, tokenizer, device, memory plan, pool and weights.

Loading streams each layer from the memory-mapped file to where the plan puts it (the device,
through the pinned staging ring, into one memory-pool block per layer; or pinned host memory, to
be streamed), so at most one layer exists twice at a time. The tokenizer is built before, not on a
thread beside the weights: measured on the H200, the two threads' turns at the GIL slowed the
weights' many small torch calls more than the overlap saved (Gemma 3 270M's weights 0.11 ->
0.87 s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from metallic.engine.arguments import cap_context, check_kv_fits
from metallic.engine.model_runner import decode_graph_rows
from metallic.engine.residency import Residency
from metallic.gguf import tokenizer_cache
from metallic.gguf.config import ModelConfig
from metallic.gguf.default_model import DEFAULT_MODEL
from metallic.gguf.reader import GGUFFile, open_gguf
from metallic.gguf.registry import resolve_model
from metallic.gguf.tokenizer import Tokenizer
from metallic.models.kv_store import KVLayout
from metallic.models.transformer import Transformer, activation_bytes, widened_bytes
from metallic.models.validate import model_config
from metallic.models.weights import estimate_bytes, host_embedding_bytes, load_weights
from metallic.ops.dispatch import use_kernels
from metallic.runtime.budget import budget_overhead, cap_torch
from metallic.runtime.device import choose_device, choose_dtype, choose_vocab_dtype
from metallic.runtime.memory import MemoryPool
from metallic.runtime.placement import (
    BudgetTooSmall,
    MemoryPlan,
    Parts,
    parse_bytes,
    plan_memory,
)
from metallic.runtime.staging import StagingRing
from metallic.runtime.warmup import start_gpu_warmup

ARENA_BYTES = 32 << 20  # the memory pool's arena size (larger buffers get their own)
# Device bytes beside weights, KV cache and a step's activations (RoPE tables: the pool's
# activations kind; sampler buffers, graph outputs, cuBLAS workspaces): 8B Q4_K_M under a 2 GiB
# budget on an H100 peaked 82 MiB over a 32 MiB allowance (arena slack included, which a
# budgeted pool no longer has), so this is measured, with room.
RUNTIME_BYTES = 160 << 20
# Under a budget, the most bytes one product widens a native matrix into at once: the 8B's
# gate|up (224 MiB) then widens in 7 slices, its output matrix in f32 (2 GiB) in 63, each a
# cuBLAS product of thousands of rows.
WIDEN_LIMIT_BYTES = 32 << 20
# Device bytes per logit of each sequence a step samples: its f32 logits, the copy of the rows
# that sample, and the sampler's temporaries at their widest (top-p without top-k: the sorted
# values and int64 ids, masks, softmax, cumulative sums: about 40 bytes live at once).
LOGIT_BYTES = 48

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
    max_seqs: int  # sequences a step may run: the engine's, or fewer under a device budget


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
    tokenizer = Tokenizer.from_metadata(gguf.metadata, tokenizer_cache.default_folder())
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
    max_seqs = n_seqs
    overhead = budget_overhead(device, budget)  # the CUDA context, libraries, modules
    if gpu_layers is not None or budget is not None:
        plan, max_seqs = plan_placement(
            gguf, config, layout, sizes, dtype=dtype, act_dtype=act_dtype, native=native,
            step_tokens=step_tokens, n_seqs=n_seqs, context_size=context_size,
            gpu_layers=gpu_layers, budget=budget, overhead=overhead,
        )  # fmt: skip
        log.info("placement: %s; %d sequences at once", plan.describe(), max_seqs)
        if budget is not None:
            kv_start = _budgeted_start(layout, kv_start, sizes, step_tokens, plan.kv_bytes)
    # Torch may hold what the budget leaves beside the memory outside it (or the whole device).
    cap_torch(device, None if budget is None else budget - sum(n for _, n in overhead))
    staging = StagingRing(device)
    # The kernel path (and any placement) keeps device buffers in a typed pool: each layer is
    # one block of its bytes packed together, so nothing pays the allocator's rounding. Under a
    # budget the pool is exact: it holds only what the plan counts, and what the residency
    # manager frees leaves the pool at once (torch's allocator, capped, hands it back to the
    # device when another allocation needs the room).
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
        build_on_host=budget is not None,  # the device never holds a part twice
    )
    model = Transformer(config, weights, device, act_dtype)
    model.widen_limit = WIDEN_LIMIT_BYTES if budget is not None else None
    residency.install(model)
    model.reserve_positions(context_size, memory)
    if warmup is not None:
        warmup.join()
    return LoadedModel(
        path, gguf, config, tokenizer, device, dtype, act_dtype, plan, memory, staging,
        residency, model, context_size, layout, sizes, kv_start, max_seqs,
    )  # fmt: skip


def plan_placement(
    gguf: GGUFFile,
    config: ModelConfig,
    layout: KVLayout,
    sizes: KVSizes,
    *,
    dtype: torch.dtype,
    act_dtype: torch.dtype,
    native: bool,
    step_tokens: int,
    n_seqs: int,
    context_size: int,
    gpu_layers: int | None,
    budget: int | None,
    overhead: Parts,
) -> tuple[MemoryPlan, int]:
    """The memory plan and the sequences a step may run, from the file's sizes alone (nothing
    is allocated). `overhead`: the budget's parts outside torch (`budget_overhead`). Under a
    budget a native embedding that the output does not share stays in host memory, and
    products widen at most WIDEN_LIMIT_BYTES at once."""
    host_embedding = host_embedding_bytes(gguf, native) if budget is not None else 0
    fixed, per_layer = estimate_bytes(gguf, config, dtype, native)
    full = layout.bytes(sizes.start())
    least = layout.bytes(sizes.least(layout, step_tokens))
    widen_limit = WIDEN_LIMIT_BYTES if budget is not None else None

    def plan_for(seqs: int) -> MemoryPlan:
        reserve = step_reserve(
            config, act_dtype, step_tokens, seqs, context_size, native, widen_limit
        )
        return plan_memory(
            per_layer, fixed - host_embedding, full, least, overhead + reserve, budget=budget,
            gpu_layers=gpu_layers, host_fixed_bytes=host_embedding,
        )  # fmt: skip

    return admit_sequences(plan_for, n_seqs, budget is not None)


def step_reserve(
    config: ModelConfig,
    act_dtype: torch.dtype,
    step_tokens: int,
    n_seqs: int,
    context_size: int,
    native: bool,
    widen_limit: int | None,
) -> Parts:
    """What the device holds for steps beside weights and KV cache, by part: the activations of
    a step of `step_tokens` tokens, the widest matrix a product widens (at most `widen_limit`),
    the logits and sampling of `n_seqs` sequences, the logits kept as outputs by the decode
    graphs, and the runtime's buffers."""
    widest = widened_bytes(config, act_dtype) if native else 0
    if widen_limit is not None:
        widest = min(widest, widen_limit)
    vocab = config.vocab_size
    return (
        (f"activations of {step_tokens} tokens", activation_bytes(config, act_dtype, step_tokens)),
        ("widened matrices", widest),
        (f"logits and sampling ({n_seqs} at once)", n_seqs * vocab * LOGIT_BYTES),
        ("decode graphs", decode_graph_rows(n_seqs, context_size) * vocab * 4),
        ("runtime", RUNTIME_BYTES),
    )


def admit_sequences(
    plan_for: Callable[[int], MemoryPlan], n_seqs: int, budgeted: bool
) -> tuple[MemoryPlan, int]:
    """The plan and the sequences a step may run. A device budget admits the most of `n_seqs`,
    halving, that keeps as many layers on the device as a single sequence would: sequences at
    once cost no resident layer, only KV cache beyond the least. The minimum budget is that of
    one sequence."""
    if not budgeted:
        return plan_for(n_seqs), n_seqs
    single = plan_for(1)  # a budget too small even for it is the minimum-budget error
    seqs = n_seqs
    while seqs > 1:
        try:
            plan = plan_for(seqs)
        except BudgetTooSmall:
            plan = None
        if plan is not None and plan.on_device == single.on_device:
            return plan, seqs
        seqs //= 2
    return single, 1


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
