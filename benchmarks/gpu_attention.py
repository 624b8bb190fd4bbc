"""How fast is the prefill (flash) attention kernel per tile shape, against torch's SDPA?

At the shapes of Llama-3-8B (32/8 heads, head_dim 128) and Gemma 3 270M (4/1 heads, head_dim
256; global layers, and sliding ones with a 512-token window), bf16, KV paged in shuffled
16-token blocks, for 512 and 2048 fresh tokens:
1. correctness first: every variant (a tile shape and a split count: the defaults, the default
   tile split 1, 2 and 4 ways, the sweep's tiles) on a fresh prefill of the timed length and on
   a chunked batch (chunks continuing a cached prefix, odd lengths) against the torch op in
   float64; a variant that fails is reported and not timed;
2. the kernel under each variant (the defaults first) against F.scaled_dot_product_attention
   on the same q/k/v made contiguous [1, H, T, D]: flash with is_causal and enable_gqa for full
   attention, a banded boolean mask over K/V repeated to every head for the window;
3. a table in µs and TFLOP/s of the visible (causal, windowed) work, the fastest variant of
   each head dim over all its rows, and JSON to $OUT (or benchmarks/results)/gpu_attention.json.
The defaults live in metallic.kernels.attention: default_prefill_config (tiles) and
default_prefill_splits (split count, "auto" in the table). Times are medians of
triton.testing.do_bench, which flushes the L2 before each run.

GPU only:  python benchmarks/gpu_attention.py [--tile BM,BN,WARPS,STAGES ...]
(--tile replaces the built-in sweep; metallic.ops imports gguf: put its wheel on PYTHONPATH as
shared/gpu.md describes). Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch
import triton
from gpu_ops import (
    BOUND,
    DEVICE,
    DTYPE,
    MODELS,
    Paged,
    cu_seqlens,
    median_ms,
    output_dir,
    prefill_error,
    randn,
    relative_error,
    sdpa_prefill,
    visible_pairs,
)

from metallic.kernels.attention import TileConfig, default_prefill_config, paged_attention_prefill
from metallic.ops.attention import attention as reference_attention

TOKENS = (512, 2048)
# (block_m, block_n, num_warps, num_stages) beside the default: shapes that ptxas -v (Triton
# 3.6, sm_90) assembles without spills, or with under 100 bytes; blocks under 64 rows use mma.sync
# instead of wgmma but give a short prefill more programs.
SWEEP = {
    head_dim: tuple(TileConfig(*tile) for tile in tiles)
    for head_dim, tiles in {
        128: ((128, 128, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 3),
              (64, 128, 8, 3), (64, 32, 4, 3)),
        256: ((64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3),
              (32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2)),
    }.items()
}  # fmt: skip
# Keys per sequence of the chunked check, and of them this step's queries (the last ones). The
# longest takes 128 blocks, as a 2048-token prefill does: the same block-table stride, so the
# same compiled kernel (Triton specializes integers divisible by 16).
SPLITS = (1, 2, 4)  # fixed split counts timed with the default tile
CHUNKED_KEYS = [2041, 777, 333, 64]
CHUNKED_NEW = [300, 777, 129, 1]


Variant = tuple[TileConfig, int | None]  # a tile shape and num_splits (None: the default's)


def variants_of(head_dim: int, tiles: list[TileConfig]) -> list[Variant]:
    """The defaults first, the default tile under fixed split counts, then the sweep's tiles (or
    those given) with default splits, without repeats."""
    default = default_prefill_config(head_dim, DTYPE)
    fixed = [(default, splits) for splits in SPLITS]
    return list(
        dict.fromkeys([(default, None), *fixed, *((t, None) for t in tiles or SWEEP[head_dim])])
    )


def chunked_errors(model: str, variants: list[Variant]) -> dict[Variant, float]:
    """Each variant's error on a batch of chunks that continue cached prefixes."""
    n_q, n_kv, head_dim, window = MODELS[model]
    keys = [randn(n, n_kv, head_dim) for n in CHUNKED_KEYS]
    values = [randn(n, n_kv, head_dim) for n in CHUNKED_KEYS]
    cache = Paged(keys, values)
    errors = {}
    for config, splits in variants:
        try:
            err = prefill_error(cache, keys, values, CHUNKED_NEW, n_q, window, config, splits)
        except Exception as exc:  # a tile shape that does not fit the multiprocessor
            print(f"{model} chunked {config}: {type(exc).__name__}: {exc}", file=sys.stderr)
            err = float("inf")
        errors[config, splits] = err
    return errors


def time_shape(
    model: str, tokens: int, variants: list[Variant], chunked: dict[Variant, float]
) -> list[dict[str, object]]:
    """One row per variant at (model, tokens): errors, then time when both checks pass."""
    n_q, n_kv, head_dim, window = MODELS[model]
    scale = head_dim**-0.5
    q = randn(tokens, n_q, head_dim)
    k, v = randn(tokens, n_kv, head_dim), randn(tokens, n_kv, head_dim)
    cache = Paged([k], [v])
    positions = torch.arange(tokens, device=DEVICE)
    ref = reference_attention(
        q.double(), k.double(), v.double(), positions, positions, scale, window
    )
    out = torch.empty_like(q)
    run_any = functools.partial(
        paged_attention_prefill,
        q,
        *cache.pools,
        cache.seq_lens,
        cu_seqlens([tokens]),
        positions,
        scale,
        window,
        max_q_len=tokens,
        out=out,
    )
    sdpa = sdpa_prefill(q, k, v, scale, window)
    torch_error = relative_error(sdpa()[0].transpose(0, 1), ref)
    torch_ms = median_ms(sdpa)
    flops = 4 * visible_pairs(tokens, window) * head_dim * n_q
    rows = []
    for config, splits in variants:
        row: dict[str, object] = {"model": model, "tokens": tokens, "config": config.__dict__}
        row["splits"], row["default"] = splits, (config, splits) == variants[0]
        run = functools.partial(run_any, config=config, num_splits=splits)
        try:
            out.fill_(float("nan"))
            run()
            row["error"] = relative_error(out, ref)
        except Exception as err:  # a tile shape that does not fit the multiprocessor
            print(f"{model} T={tokens} {config}: {type(err).__name__}: {err}", file=sys.stderr)
            row["error"] = float("inf")
        row["chunked_error"] = chunked[config, splits]
        row["ok"] = row["error"] < BOUND and row["chunked_error"] < BOUND
        row["ms"] = median_ms(run) if row["ok"] else None
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12 if row["ms"] else None
        row["torch_ms"], row["torch_error"] = torch_ms, torch_error
        row["torch_tflops"] = flops / (torch_ms * 1e-3) / 1e12
        rows.append(row)
    return rows


def fastest(rows: list[dict[str, object]]) -> dict[int, dict[str, object]]:
    """Per head dim, the tile shape with the least total time over that dim's rows."""
    totals: dict[int, dict[tuple, float]] = {}
    for r in rows:
        head_dim = MODELS[r["model"]][2]
        key = (*r["config"].values(), r["splits"])
        total = totals.setdefault(head_dim, {})
        ms = r["ms"] if r["ms"] is not None else float("inf")
        total[key] = total.get(key, 0.0) + ms
    return {
        d: {"config": dict(zip(TileConfig.__dataclass_fields__, min(t, key=t.get)[:4],
                               strict=True)),
            "splits": min(t, key=t.get)[4], "total_ms": min(t.values())}
        for d, t in totals.items()
    }  # fmt: skip


def print_table(rows: list[dict[str, object]], best: dict[int, dict[str, object]]) -> None:
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}")
    print(
        f"{'shape':<26} {'tile bm,bn,w,s':<15} {'splits':>6} {'us':>7} {'TFLOP/s':>8} "
        f"{'torch us':>8} {'TFLOP/s':>8} {'speedup':>7} {'rel err':>8} {'chunked':>8}"
    )
    for r in rows:
        shape = f"{r['model']} T={r['tokens']}"
        tile = ",".join(str(x) for x in r["config"].values()) + ("*" if r["default"] else "")
        splits = "auto" if r["splits"] is None else str(r["splits"])
        us = f"{1e3 * r['ms']:7.1f}" if r["ms"] else "   FAIL"
        rate = f"{r['tflops']:8.1f}" if r["tflops"] else " " * 8
        speedup = f"{r['torch_ms'] / r['ms']:6.2f}x" if r["ms"] else " " * 7
        print(
            f"{shape:<26} {tile:<15} {splits:>6} {us} {rate} {1e3 * r['torch_ms']:8.1f} "
            f"{r['torch_tflops']:8.1f} {speedup} {r['error']:8.1e} {r['chunked_error']:8.1e}"
        )
    print("* the default (default_prefill_config, default_prefill_splits); torch rel err:", end="")
    for r in rows:
        if r["default"]:
            print(f" {r['model']} T={r['tokens']} {r['torch_error']:.1e}", end="")
    print()
    for head_dim, b in best.items():
        splits = "auto" if b["splits"] is None else b["splits"]
        print(
            f"fastest over head_dim {head_dim} rows: {b['config']} splits {splits} "
            f"({b['total_ms']:.3f} ms)"
        )


def parse_tile(text: str) -> TileConfig:
    block_m, block_n, warps, stages = (int(x) for x in text.split(","))
    return TileConfig(block_m, block_n, warps, stages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=parse_tile, action="append", default=[])
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    rows: list[dict[str, object]] = []
    for model in MODELS:
        variants = variants_of(MODELS[model][2], args.tile)
        chunked = chunked_errors(model, variants)
        for tokens in TOKENS:
            rows.extend(time_shape(model, tokens, variants, chunked))
    best = fastest(rows)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": rows,
        "fastest": {str(d): b for d, b in best.items()},
        "seconds": time.time() - started,
    }
    (output_dir() / "gpu_attention.json").write_text(json.dumps(result, indent=2))
    print_table(rows, best)
    print(f"total {time.time() - started:.0f} s")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
