"""Flash attention over a paged KV cache: a tiled prefill kernel and a split-K decode kernel.

Computes exactly `metallic.ops.attention.attention` for keys that sit in a paged pool. Pools are
`[n_blocks, block_size, Hkv, D]`; sequence s's key of logical index j lives in block
`block_table[s, j // block_size]` at row `j % block_size`, and its position is j (a contiguous
cache is the identity block table). Key j is visible to a query at position p when `j <= p` and,
with a window W > 0, `p - j < W`. Keys below the smallest `p - W + 1` of a tile are never read
(neither their block-table entries nor their rows), so a sliding-window layer may recycle the
blocks that fell out of every window.

A tile's query rows pack (token, head) pairs of one KV group, so each key/value tile is loaded
once for all the query heads that share it (GQA). Scores and accumulators are f32; the softmax
runs online in base 2 with the scale folded in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from metallic.errors import MetallicError
from metallic.kernels.pdl import pdl_launch, wait_for_inputs

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_NO_WINDOW = 1 << 30  # the window the kernels get for full attention: farther than any position
# (query, head) rows of one decode tile, few enough for its f32 accumulator to stay in registers
_MAX_DECODE_ROWS = 64
# Keys per decode split at least (default split count). A split's tiles run serially, each a
# chain of dependent loads (block table, keys, values) of ~3-4 us on an H200 whatever its width,
# so short contexts take as many splits as the SMs hold, each one tile of 16-32 keys (H200, a
# 600-key decode replayed from a graph: Gemma 3's layer 14.9 -> 5.2 us, Llama-3-8B's ~11.7 -> 5.5).
_MIN_SPLIT_KEYS = 16
_DECODE_BLOCK_M = 16  # (query, head) rows of a decode tile at least: tl.dot's minimum
_MAX_SPLITS = 64  # the merge holds every split of a row at once
# Up to this many splits, the decode kernel's last split of a tile merges them itself (a loop
# over the splits, in one program) instead of a second launch; more are merged by _combine_kernel,
# which spreads the rows over programs. Each turn of that loop waits on a load: in the engine
# (Gemma 3, H200) 16 splits merged so took 1,351 tok/s against 1,546 through the second launch.
_MAX_MERGED_SPLITS = 4


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of an attention kernel (block_m query rows x block_n keys)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_prefill_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Tiles for Hopper (wgmma, 228 KB of shared memory per SM) that ptxas compiles for sm_90
    without register spills; benchmarks/gpu_ops.py times the alternatives. f32 caches take exact
    f32 dots, done with FMAs in registers: a correct but slow fallback that needs small tiles."""
    if dtype == torch.float32:
        if head_dim <= 128:
            return TileConfig(block_m=32, block_n=32, num_warps=8, num_stages=1)
        return TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 128:
        return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return TileConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)


def default_decode_config(head_dim: int, dtype: torch.dtype, split_keys: int = 64) -> TileConfig:
    """Tiles for decode splits of about `split_keys` keys: one tile a split where it fits (the
    tiles of a split are a serial chain of memory latencies), unpipelined since nothing is left
    to overlap. Longer splits keep the tiles measured before (in the engine, 64-key tiles at
    head_dim 256 took Gemma 3's decode from 1,508 to 1,206 tok/s). block_m is only a floor
    here: decode tiles hold the (query, head) rows of one KV group."""
    if dtype == torch.float32:
        return TileConfig(_DECODE_BLOCK_M, 16, num_warps=4, num_stages=1)
    widest = 64 if head_dim <= 128 else 32
    block_n = min(widest, max(16, triton.next_power_of_2(split_keys)))
    return TileConfig(
        _DECODE_BLOCK_M, block_n, num_warps=4, num_stages=1 if block_n >= split_keys else 3
    )


@triton.jit
def _attend_keys(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    key_lo,
    key_hi,
    k_ptr,
    v_ptr,
    table_ptr,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    offs_d,
    d_ok,
    qk_scale,
    window,
    KV_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys [key_lo, key_hi) into the online-softmax state (acc, m_i, l_i) of tile q.

    k_ptr/v_ptr already point at this KV head; m_i is in base-2 units of scaled scores.
    """
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_hi
        block = tl.load(table_ptr + keys // KV_BLOCK, mask=key_ok, other=0).to(tl.int64)
        row = keys % KV_BLOCK
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + (block * stride_kb + row * stride_kt)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        delta = q_pos[:, None] - keys[None, :]
        visible = (delta >= 0) & (delta < window) & key_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Rows that have seen no visible key yet keep m = -inf; exponentiate against 0 instead.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + (block * stride_vb + row * stride_vt)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    out_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    q_pos_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_table,
    group,
    heads_per_tile,
    tokens_per_tile,
    n_subgroups,
    qk_scale,
    window,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    # Last query tiles first: under the causal mask they see the most keys, so they start early.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1) // n_subgroups
    subgroup = tl.program_id(1) % n_subgroups
    seq = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
    first_token = tile * tokens_per_tile
    if first_token >= q_len:
        return
    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // heads_per_tile
    head_in_group = subgroup * heads_per_tile + rows % heads_per_tile
    row_ok = (rows < tokens_per_tile * heads_per_tile) & (token < q_len) & (head_in_group < group)
    head = kv_head * group + head_in_group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = (q_start + token) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    q_pos = tl.load(q_pos_ptr + q_start + token, mask=row_ok, other=0).to(tl.int32)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    key_hi = tl.minimum(seq_len, tl.max(tl.where(row_ok, q_pos, -1)) + 1)
    lowest_pos = tl.min(tl.where(row_ok, q_pos, key_hi))
    key_lo = tl.maximum(lowest_pos - window + 1, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_keys(
        acc,
        m_i,
        l_i,
        q,
        q_pos,
        key_lo,
        key_hi,
        k_ptr + kv_head * stride_kh,
        v_ptr + kv_head * stride_vh,
        table_ptr + seq.to(tl.int64) * stride_table,
        stride_kb,
        stride_kt,
        stride_vb,
        stride_vt,
        offs_d,
        d_ok,
        qk_scale,
        window,
        KV_BLOCK,
        BLOCK_N,
        DOT_PRECISION,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = (q_start + token) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + out_rows[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _decode_kernel(
    q_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    arrivals_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    seq_lens_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_table,
    queries_per_seq,
    group,
    heads_per_tile,
    n_subgroups,
    qk_scale,
    window,
    num_splits,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    MERGE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    split = tl.program_id(0)
    kv_head = tl.program_id(1) // n_subgroups
    subgroup = tl.program_id(1) % n_subgroups
    seq = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)
    token = rows // heads_per_tile
    head_in_group = subgroup * heads_per_tile + rows % heads_per_tile
    row_ok = (token < queries_per_seq) & (head_in_group < group)
    head = kv_head * group + head_in_group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_index = seq * queries_per_seq + token
    q = tl.load(
        q_ptr + (q_index * stride_qt + head * stride_qh)[:, None] + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    q = q.to(k_ptr.dtype.element_ty)
    # The queries are the sequence's last tokens: positions seq_len - queries_per_seq + i.
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    q_pos = seq_len - queries_per_seq + token
    key_lo = tl.maximum(seq_len - queries_per_seq - window + 1, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - key_lo, num_splits), BLOCK_N) * BLOCK_N
    split_lo = key_lo + split * chunk
    split_hi = tl.minimum(seq_len, split_lo + chunk)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_keys(
        acc,
        m_i,
        l_i,
        q,
        q_pos,
        split_lo,
        split_hi,
        k_ptr + kv_head * stride_kh,
        v_ptr + kv_head * stride_vh,
        table_ptr + seq.to(tl.int64) * stride_table,
        stride_kb,
        stride_kt,
        stride_vb,
        stride_vt,
        offs_d,
        d_ok,
        qk_scale,
        window,
        KV_BLOCK,
        BLOCK_N,
        DOT_PRECISION,
    )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_rows = q_index * stride_ot + head * stride_oh
    if SPLIT:
        # Partial results of this split: normalized output and its log2-sum-exp2.
        tile = seq * tl.num_programs(1) + tl.program_id(1)
        part = tile * num_splits + split
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + part * BLOCK_M + rows, lse)
        part_offs = (part * BLOCK_M + rows)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(part_out_ptr + part_offs, out)
        if MERGE:
            # The tile's last split to arrive merges them all. The barrier orders every
            # thread's stores before the counter's release; the acquire of the last arrival
            # makes the other splits' stores visible to it. It leaves the counter at zero.
            tl.debug_barrier()
            arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")
                merged = _merge_splits(part_out_ptr, part_lse_ptr, tile * num_splits, num_splits,
                                       rows, row_ok, offs_d, BLOCK_M, BLOCK_D)  # fmt: skip
                tl.store(
                    out_ptr + out_rows[:, None] + offs_d[None, :],
                    merged.to(out_ptr.dtype.element_ty),
                    mask=q_mask,
                )
    else:
        tl.store(
            out_ptr + out_rows[:, None] + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, first_part, num_splits, rows, row_ok, offs_d,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """The rows of one tile merged over its splits' partial results (weights 2^(lse_i - max)),
    a split at a time. Loads bypass L1 (.cg): other programs wrote the partials."""
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(num_splits):
        lse = tl.load(part_lse_ptr + (first_part + split) * BLOCK_M + rows, cache_modifier=".cg")
        lse_max = tl.maximum(lse_max, lse)
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(num_splits):
        part_rows = (first_part + split) * BLOCK_M + rows
        weight = tl.exp2(tl.load(part_lse_ptr + part_rows, cache_modifier=".cg") - lse_ref)
        parts = tl.load(
            part_out_ptr + part_rows[:, None] * BLOCK_D + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        total += weight
        acc += parts * weight[:, None]
    return acc / tl.where(total == 0.0, 1.0, total)[:, None]


@triton.jit
def _combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    queries_per_seq,
    group,
    heads_per_tile,
    n_subgroups,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    """Merge the splits of one query row, all splits at once (weights 2^(lse_i - max lse)):
    a loop over splits would chain one memory latency per split."""
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    kv_head = tl.program_id(1) // n_subgroups
    subgroup = tl.program_id(1) % n_subgroups
    seq = tl.program_id(2)
    token = row // heads_per_tile
    head_in_group = subgroup * heads_per_tile + row % heads_per_tile
    splits = tl.arange(0, BLOCK_S)
    # The row's validity as a vector: scalar masks are not portable across backends.
    row_ok = (splits * 0 + token < queries_per_seq) & (splits * 0 + head_in_group < group)
    split_ok = (splits < num_splits) & row_ok
    first_part = (seq * tl.num_programs(1) + tl.program_id(1)) * num_splits
    part_rows = (first_part + splits) * BLOCK_M + row
    lse = tl.load(part_lse_ptr + part_rows, mask=split_ok, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    offs_d = tl.arange(0, BLOCK_D)
    parts = tl.load(
        part_out_ptr + part_rows[:, None] * BLOCK_D + offs_d[None, :],
        mask=split_ok[:, None],
        other=0.0,
    )
    total = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    out_row = (seq * queries_per_seq + token) * stride_ot + (
        kv_head * group + head_in_group
    ) * stride_oh
    tl.store(
        out_ptr + out_row + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_d < HEAD_DIM)
        & (offs_d * 0 + token < queries_per_seq)
        & (offs_d * 0 + head_in_group < group),
    )


@dataclass(frozen=True)
class _Layout:
    """Shapes shared by the wrappers, checked once."""

    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    block_size: int
    group: int


def _check_layout(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
    caller: str,
) -> _Layout:
    if q.dim() != 3 or q.stride(-1) != 1:
        raise MetallicError(f"{caller}: q must be [T, Hq, D] with a contiguous last dim")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise MetallicError(
            f"{caller}: k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} must both "
            "be [n_blocks, block_size, Hkv, D]"
        )
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or k_pool.dtype != v_pool.dtype:
        raise MetallicError(f"{caller}: k_pool and v_pool need one dtype and a contiguous last dim")
    _, block_size, n_kv_heads, head_dim = k_pool.shape
    n_q_heads = q.shape[1]
    if q.shape[2] != head_dim or n_q_heads % n_kv_heads:
        raise MetallicError(
            f"{caller}: q {tuple(q.shape)} does not fit {n_kv_heads} KV heads of dim {head_dim}"
        )
    if not 16 <= head_dim <= _MAX_HEAD_DIM:
        raise MetallicError(f"{caller}: head_dim {head_dim} outside the supported 16..256")
    if block_table.dim() != 2 or block_table.stride(-1) != 1 or block_table.is_floating_point():
        raise MetallicError(f"{caller}: block_table must be an integer [n_seqs, max_blocks]")
    if seq_lens.shape != (block_table.shape[0],):
        raise MetallicError(
            f"{caller}: seq_lens {tuple(seq_lens.shape)} for {block_table.shape[0]} sequences"
        )
    if out is not None and (out.shape != q.shape or out.stride(-1) != 1):
        raise MetallicError(f"{caller}: out {tuple(out.shape)} must match q {tuple(q.shape)}")
    return _Layout(n_q_heads, n_kv_heads, head_dim, block_size, n_q_heads // n_kv_heads)


def _kernel_window(window: int) -> int:
    """The kernels' window: keys at distance >= it are hidden; 0 (none) becomes unreachable."""
    if window < 0:
        raise MetallicError(f"attention: negative sliding window {window}")
    return window or _NO_WINDOW


def _dot_precision(dtype: torch.dtype) -> str:
    """f32 caches get exact f32 dots rather than TF32, to match the torch path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_attention_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    max_q_len: int | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Attention of q [T, Hq, D] (sequences packed back to back) over the paged cache.

    Sequence s owns query rows `cu_seqlens_q[s] : cu_seqlens_q[s + 1]` at positions
    `q_positions`, and sees its keys [0, seq_lens[s]) (this step's keys already stored, see
    `store_kv`). `max_q_len` (the longest query span) sizes the grid; pass it from the host to
    avoid a device sync. Writes into `out` (default: a new tensor of q's dtype) and returns it.
    """
    layout = _check_layout(q, k_pool, v_pool, block_table, seq_lens, out, "paged_attention_prefill")
    kernel_window = _kernel_window(window)
    n_seqs = block_table.shape[0]
    if cu_seqlens_q.shape != (n_seqs + 1,) or q_positions.shape != (q.shape[0],):
        raise MetallicError(
            f"paged_attention_prefill: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and q_positions "
            f"{tuple(q_positions.shape)} do not describe {n_seqs} sequences of {q.shape[0]} tokens"
        )
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if n_seqs else 0
    if max_q_len == 0 or q.shape[0] == 0:
        return out
    config = config or default_prefill_config(layout.head_dim, k_pool.dtype)
    heads_per_tile = min(layout.group, config.block_m)
    tokens_per_tile = config.block_m // heads_per_tile
    n_subgroups = triton.cdiv(layout.group, heads_per_tile)
    grid = (triton.cdiv(max_q_len, tokens_per_tile), layout.n_kv_heads * n_subgroups, n_seqs)
    _prefill_kernel[grid](
        q,
        out,
        k_pool,
        v_pool,
        block_table,
        seq_lens,
        cu_seqlens_q,
        q_positions,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        block_table.stride(0),
        layout.group,
        heads_per_tile,
        tokens_per_tile,
        n_subgroups,
        scale * _LOG2E,
        kernel_window,
        HEAD_DIM=layout.head_dim,
        KV_BLOCK=layout.block_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=triton.next_power_of_2(layout.head_dim),
        DOT_PRECISION=_dot_precision(k_pool.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(q.device),
    )
    return out


_ARRIVAL_SLOTS = 4096  # tiles (sequence x KV head x subgroup) of a decode launch that can merge
_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device) -> torch.Tensor | None:
    """The device's split-arrival counters, zero between launches (the merging program resets
    its tile's): allocated once, never freed, since captured graphs keep their address. None
    while a graph is being captured before any eager launch allocated them."""
    if device not in _ARRIVALS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _ARRIVALS[device] = torch.zeros(_ARRIVAL_SLOTS, dtype=torch.int32, device=device)
    return _ARRIVALS[device]


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(q: torch.Tensor, base_programs: int, max_keys: int) -> int:
    """Enough splits to give every SM about two programs, each of at least _MIN_SPLIT_KEYS
    keys. A graph captured for a key bound runs shorter sequences with some splits empty."""
    programs = 2 * _multiprocessors(q.device.index or 0) if q.is_cuda else 4
    by_keys = triton.cdiv(max_keys, _MIN_SPLIT_KEYS)
    return max(1, min(by_keys, triton.cdiv(programs, base_programs), _MAX_SPLITS))


def paged_attention_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    queries_per_seq: int = 1,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Attention of the last `queries_per_seq` tokens of each sequence over a long paged cache.

    q is [n_seqs * queries_per_seq, Hq, D], sequence-major; query i of sequence s sits at
    position `seq_lens[s] - queries_per_seq + i` (its key already stored). The attended keys are
    split across `num_splits` programs per (sequence, KV head), whose partial softmax states the
    last of them to finish merges (a second kernel does, past _MAX_MERGED_SPLITS splits).
    `max_seq_len` (default: the block table's capacity) bounds the key count when choosing the
    split count; pass it from the host to avoid oversplitting.
    """
    layout = _check_layout(q, k_pool, v_pool, block_table, seq_lens, out, "paged_attention_decode")
    kernel_window = _kernel_window(window)
    n_seqs = block_table.shape[0]
    if queries_per_seq < 1 or q.shape[0] != n_seqs * queries_per_seq:
        raise MetallicError(
            f"paged_attention_decode: q has {q.shape[0]} rows, not {n_seqs} sequences x "
            f"{queries_per_seq} queries"
        )
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n_seqs == 0:
        return out
    if queries_per_seq > _MAX_DECODE_ROWS:
        raise MetallicError(
            f"paged_attention_decode: {queries_per_seq} queries per sequence (at most "
            f"{_MAX_DECODE_ROWS}; use paged_attention_prefill)"
        )
    rows = queries_per_seq * layout.group
    floor = _DECODE_BLOCK_M if config is None else config.block_m
    block_m = max(floor, triton.next_power_of_2(min(rows, _MAX_DECODE_ROWS)))
    heads_per_tile = min(layout.group, block_m // queries_per_seq)
    n_subgroups = triton.cdiv(layout.group, heads_per_tile)
    block_d = triton.next_power_of_2(layout.head_dim)
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * layout.block_size
    max_keys = min(max_seq_len, window + queries_per_seq - 1) if window else max_seq_len
    base_programs = n_seqs * layout.n_kv_heads * n_subgroups
    if num_splits is None:
        num_splits = _default_splits(q, base_programs, max(max_keys, 1))
    elif not 1 <= num_splits <= _MAX_SPLITS:
        raise MetallicError(
            f"paged_attention_decode: num_splits {num_splits} outside 1..{_MAX_SPLITS}"
        )
    if config is None:
        split_keys = triton.cdiv(max(max_keys, 1), num_splits)
        config = default_decode_config(layout.head_dim, k_pool.dtype, split_keys)
    split = num_splits > 1
    arrivals = _arrival_counters(q.device) if split else None
    merge = arrivals is not None and num_splits <= _MAX_MERGED_SPLITS
    merge = merge and base_programs <= _ARRIVAL_SLOTS
    part_shape = (base_programs * num_splits, block_m)
    part_lse = torch.empty(part_shape if split else (1,), dtype=torch.float32, device=q.device)
    part_out = torch.empty(
        (*part_shape, block_d) if split else (1,), dtype=torch.float32, device=q.device
    )
    grid = (num_splits, layout.n_kv_heads * n_subgroups, n_seqs)
    _decode_kernel[grid](
        q,
        out,
        part_out,
        part_lse,
        arrivals if arrivals is not None else part_lse,
        k_pool,
        v_pool,
        block_table,
        seq_lens,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        block_table.stride(0),
        queries_per_seq,
        layout.group,
        heads_per_tile,
        n_subgroups,
        scale * _LOG2E,
        kernel_window,
        num_splits,
        HEAD_DIM=layout.head_dim,
        KV_BLOCK=layout.block_size,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(k_pool.dtype),
        SPLIT=split,
        MERGE=merge,
        num_warps=min(8, max(config.num_warps, block_m * block_d // 2048)),
        num_stages=config.num_stages,
        **pdl_launch(q.device),
    )
    if split and not merge:
        combine_grid = (queries_per_seq * heads_per_tile, grid[1], n_seqs)
        _combine_kernel[combine_grid](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            queries_per_seq,
            layout.group,
            heads_per_tile,
            n_subgroups,
            num_splits,
            HEAD_DIM=layout.head_dim,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
            **pdl_launch(q.device),
        )
    return out


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_pool_ptr,
    v_pool_ptr,
    table_ptr,
    cu_q_ptr,
    pos_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kb,
    stride_ktok,
    stride_kvh,
    stride_vb,
    stride_vtok,
    stride_vvh,
    stride_table,
    block_size,
    n_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    seq = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < q_len
    cols = tl.arange(0, BLOCK_HD)
    head = cols // BLOCK_D
    dim = cols % BLOCK_D
    col_ok = (head < n_kv_heads) & (dim < HEAD_DIM)
    mask = token_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + q_start + tokens, mask=token_ok, other=0)
    block = tl.load(
        table_ptr + seq.to(tl.int64) * stride_table + pos // block_size, mask=token_ok, other=0
    ).to(tl.int64)
    row = pos % block_size
    src = (q_start + tokens)[:, None]
    k = tl.load(k_ptr + src * stride_kt + (head * stride_kh + dim)[None, :], mask=mask)
    v = tl.load(v_ptr + src * stride_vt + (head * stride_vh + dim)[None, :], mask=mask)
    k_dst = (block * stride_kb + row * stride_ktok)[:, None] + (head * stride_kvh + dim)[None, :]
    v_dst = (block * stride_vb + row * stride_vtok)[:, None] + (head * stride_vvh + dim)[None, :]
    tl.store(k_pool_ptr + k_dst, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(v_pool_ptr + v_dst, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    positions: torch.Tensor,
    *,
    max_q_len: int | None = None,
) -> None:
    """Write this step's k/v [T, Hkv, D] into the pools at their positions, through the table.

    Token rows are packed per sequence as in `paged_attention_prefill` (same cu_seqlens_q and
    positions); values are cast to the pool dtype.
    """
    if k.shape != v.shape or k.dim() != 3 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise MetallicError(
            f"store_kv: k {tuple(k.shape)} and v {tuple(v.shape)} must be [T, Hkv, D] with a "
            "contiguous last dim"
        )
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape or k_pool.shape[2:] != k.shape[1:]:
        raise MetallicError(
            f"store_kv: pools {tuple(k_pool.shape)} do not hold keys of shape {tuple(k.shape[1:])}"
        )
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise MetallicError("store_kv: pools need a contiguous last dim")
    n_seqs = block_table.shape[0]
    if cu_seqlens_q.shape != (n_seqs + 1,) or positions.shape != (k.shape[0],):
        raise MetallicError(
            f"store_kv: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and positions "
            f"{tuple(positions.shape)} do not describe {n_seqs} sequences of {k.shape[0]} tokens"
        )
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if n_seqs else 0
    if max_q_len == 0:
        return
    _, block_size, n_kv_heads, head_dim = k_pool.shape
    block_d = triton.next_power_of_2(head_dim)
    block_hd = triton.next_power_of_2(n_kv_heads) * block_d
    block_t = max(1, min(triton.next_power_of_2(max_q_len), 4096 // block_hd))
    _store_kv_kernel[(triton.cdiv(max_q_len, block_t), n_seqs)](
        k,
        v,
        k_pool,
        v_pool,
        block_table,
        cu_seqlens_q,
        positions,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        block_table.stride(0),
        block_size,
        n_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_T=block_t,
        BLOCK_HD=block_hd,
        BLOCK_D=block_d,
        num_warps=4,
        **pdl_launch(k.device),
    )
