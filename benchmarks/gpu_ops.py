"""How fast are the non-matmul Triton kernels (attention, RMSNorm, RoPE, gated activation)?

At Gemma 3 270M (4 query heads, 1 KV head, head_dim 256, sliding window 512 on 5 of 6 layers) and
Llama-3-8B (32/8 heads, head_dim 128) shapes, in bf16:
1. correctness first: every kernel against the torch op in float64 on fresh random inputs, the
   attention caches paged into shuffled 16-token blocks, several sequences of different lengths;
2. prefill attention (512 and 2048 tokens) against torch SDPA (flash for causal; a banded mask,
   K/V expanded to every head, for the window), in TFLOP/s of useful (visible) work;
3. decode attention (batch 1 and 8, context 512 and 4096) against SDPA, as KV bytes read / time,
   a share of a device-to-device copy measured in the same run; element-wise ops likewise;
4. a small sweep of tile shapes, to move the defaults in metallic/kernels/attention.py.
Times are medians of triton.testing.do_bench, which flushes the L2 before each run.

GPU only, never in CI:  python benchmarks/gpu_ops.py   (JSON to $OUT or benchmarks/results;
metallic.ops imports gguf: put its wheel on PYTHONPATH as shared/gpu.md describes). Exit 1 if a
check fails.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from metallic.kernels.activation import gated_activation
from metallic.kernels.attention import (
    TileConfig,
    default_decode_config,
    default_prefill_config,
    paged_attention_decode,
    paged_attention_prefill,
    store_kv,
)
from metallic.kernels.norm import rms_norm
from metallic.kernels.rope import apply_rope
from metallic.ops import activation as ref_activation
from metallic.ops import norm as ref_norm
from metallic.ops import rope as ref_rope
from metallic.ops.attention import attention as reference_attention

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
BOUND = 2e-2  # bf16 storage of q/k/v/p: ~4e-3 expected; f32 math throughout
# name: (query heads, KV heads, head_dim, window)
MODELS = {
    "gemma3-270m/sliding": (4, 1, 256, 512),
    "gemma3-270m/global": (4, 1, 256, 0),
    "llama3-8b": (32, 8, 128, 0),
}
PREFILL_TOKENS = (512, 2048)
DECODE = ((1, 512), (1, 4096), (8, 512), (8, 4096))  # (batch, context)
PREFILL_SWEEP = {  # shapes that compile for sm_90 without register spills
    128: (
        TileConfig(128, 64, 8, 4),
        TileConfig(128, 32, 8, 3),
        TileConfig(64, 64, 8, 3),
        TileConfig(64, 64, 4, 3),
    ),
    256: (
        TileConfig(64, 32, 8, 3),
        TileConfig(32, 64, 4, 2),
        TileConfig(128, 32, 8, 3),
        TileConfig(128, 32, 8, 2),
    ),
}
DECODE_SWEEP = {
    128: (TileConfig(16, 32, 4, 3), TileConfig(16, 128, 4, 3), TileConfig(16, 64, 8, 2)),
    256: (TileConfig(16, 16, 4, 3), TileConfig(16, 64, 4, 2), TileConfig(16, 32, 8, 3)),
}


def median_ms(fn: object) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src)) * 1e-3)


class Paged:
    """Keys/values of several sequences stored through `store_kv` into shuffled blocks."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        lengths = [k.shape[0] for k in keys]
        counts = [triton.cdiv(n, BLOCK_SIZE) for n in lengths]
        n_blocks = sum(counts) + 1
        order = torch.randperm(n_blocks, device=DEVICE).to(torch.int32)
        self.block_table = torch.zeros(len(keys), max(counts), dtype=torch.int32, device=DEVICE)
        used = 0
        for seq, count in enumerate(counts):
            self.block_table[seq, :count] = order[used : used + count]
            used += count
        _, n_kv_heads, head_dim = keys[0].shape
        shape = (n_blocks, BLOCK_SIZE, n_kv_heads, head_dim)
        self.k_pool = torch.zeros(shape, dtype=DTYPE, device=DEVICE)
        self.v_pool = torch.zeros(shape, dtype=DTYPE, device=DEVICE)
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        positions = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])
        store_kv(
            torch.cat(keys),
            torch.cat(values),
            self.k_pool,
            self.v_pool,
            self.block_table,
            cu_seqlens(lengths),
            positions,
            max_q_len=max(lengths),
        )

    @property
    def pools(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k_pool, self.v_pool, self.block_table


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).to(
        DEVICE
    )


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(DTYPE)


def check(checks: list[dict[str, object]], name: str, err: float, bound: float = BOUND) -> None:
    checks.append({"check": name, "relative_error": err, "bound": bound, "ok": err < bound})


def check_elementwise(checks: list[dict[str, object]]) -> None:
    x, residual, weight = randn(300, 4096), torch.randn(300, 4096, device=DEVICE), randn(4096)
    summed = residual + x.float()
    out = rms_norm(x, weight, 1e-5, residual=residual)
    ref = ref_norm.rms_norm(summed.double(), weight.double(), 1e-5)
    check(checks, "rms_norm+residual [300,4096]", relative_error(out, ref), 1e-5)
    check(checks, "rms_norm residual write", relative_error(residual, summed), 1e-7)
    qk = randn(300, 8, 256)
    ref = ref_norm.rms_norm(qk.double(), weight[:256].double(), 1e-6)
    check(
        checks,
        "rms_norm per head [300,8,256]",
        relative_error(rms_norm(qk, weight[:256], 1e-6), ref),
    )
    for neox, rope_dim in ((True, 256), (False, 128)):
        table = ref_rope.RopeTable(rope_dim, 10000.0, device=DEVICE)
        table.ensure(8192)
        positions = torch.randint(0, 8192, (300,), device=DEVICE)
        q, k = randn(300, 32, 256), randn(300, 8, 256)
        ref_q = ref_rope.rotate(q.double(), *table.angles(positions), table.rope_dim, neox)
        ref_k = ref_rope.rotate(k.double(), *table.angles(positions), table.rope_dim, neox)
        apply_rope(q, k, positions, table.cos, table.sin, neox)
        err = max(relative_error(q, ref_q), relative_error(k, ref_k))
        check(checks, f"rope neox={neox} rope_dim={rope_dim}", err)
    for kind in ("silu", "gelu_tanh"):
        gate_up = 3 * randn(300, 2 * 14336)
        out = gated_activation(gate_up, None, kind)
        gate, up = gate_up.double().chunk(2, dim=-1)
        ref = ref_activation.gated_activation(gate, up, kind)
        check(checks, f"gated {kind} [300,2x14336]", relative_error(out, ref))


def check_attention(checks: list[dict[str, object]]) -> None:
    """Prefill (a fresh and a chunked sequence) and decode (1 and 4 queries) at real shapes."""
    for model, (n_q, n_kv, head_dim, window) in MODELS.items():
        scale = head_dim**-0.5
        lengths = [1500, 777, 64]  # keys per sequence
        new = [1500, 200, 1]  # of which this step's queries (the last ones)
        keys = [randn(n, n_kv, head_dim) for n in lengths]
        values = [randn(n, n_kv, head_dim) for n in lengths]
        cache = Paged(keys, values)
        q = randn(sum(new), n_q, head_dim)
        q_pos = torch.cat(
            [torch.arange(n - m, n, device=DEVICE) for n, m in zip(lengths, new, strict=True)]
        )
        out = paged_attention_prefill(
            q,
            *cache.pools,
            cache.seq_lens,
            cu_seqlens(new),
            q_pos,
            scale,
            window,
            max_q_len=max(new),
        )
        cu = cu_seqlens(new).tolist()
        errors = []
        for seq, n in enumerate(lengths):
            rows = slice(cu[seq], cu[seq + 1])
            ref = reference_attention(
                q[rows].double(),
                keys[seq].double(),
                values[seq].double(),
                q_pos[rows],
                torch.arange(n, device=DEVICE),
                scale,
                window,
            )
            errors.append(relative_error(out[rows], ref))
        check(checks, f"prefill {model}", max(errors))
        for queries in (1, 4):
            q = randn(len(lengths) * queries, n_q, head_dim)
            out = paged_attention_decode(
                q,
                *cache.pools,
                cache.seq_lens,
                scale,
                window,
                queries_per_seq=queries,
                max_seq_len=max(lengths),
            )
            errors = []
            for seq, n in enumerate(lengths):
                rows = slice(seq * queries, (seq + 1) * queries)
                ref = reference_attention(
                    q[rows].double(),
                    keys[seq].double(),
                    values[seq].double(),
                    torch.arange(n - queries, n, device=DEVICE),
                    torch.arange(n, device=DEVICE),
                    scale,
                    window,
                )
                errors.append(relative_error(out[rows], ref))
            check(checks, f"decode {model} x{queries} queries", max(errors))


def visible_pairs(tokens: int, window: int) -> int:
    """(query, key) pairs a causal (windowed) prefill of `tokens` fresh tokens computes."""
    return sum(min(i + 1, window) if window else i + 1 for i in range(tokens))


def time_configs(
    sweep: list[dict[str, object]],
    op: str,
    shape: str,
    run: functools.partial,
    configs: tuple[TileConfig, ...],
    as_graph: bool = False,
) -> None:
    for config in configs:
        try:
            fn = functools.partial(run, config=config)
            ms = median_ms(graphed(fn) if as_graph else fn)
        except Exception as err:  # a tile shape that does not fit shared memory
            ms = None
            print(f"sweep {op} {shape} {config}: {type(err).__name__}: {err}", file=sys.stderr)
        sweep.append({"op": op, "shape": shape, "config": config.__dict__, "ms": ms})


def time_prefill(rows: list[dict[str, object]], sweep: list[dict[str, object]]) -> None:
    for model, (n_q, n_kv, head_dim, window) in MODELS.items():
        scale = head_dim**-0.5
        for tokens in PREFILL_TOKENS:
            q = randn(tokens, n_q, head_dim)
            k, v = randn(tokens, n_kv, head_dim), randn(tokens, n_kv, head_dim)
            cache = Paged([k], [v])
            run = functools.partial(
                paged_attention_prefill,
                q,
                *cache.pools,
                cache.seq_lens,
                cu_seqlens([tokens]),
                torch.arange(tokens, device=DEVICE),
                scale,
                window,
                max_q_len=tokens,
                out=torch.empty_like(q),
            )
            default = default_prefill_config(head_dim, DTYPE)
            ms = median_ms(functools.partial(run, config=default))
            flops = 4 * visible_pairs(tokens, window) * head_dim * n_q
            shape = f"{model} T={tokens}"
            rows.append(
                {
                    "op": "attn prefill",
                    "shape": shape,
                    "ms": ms,
                    "torch_ms": median_ms(sdpa_prefill(q, k, v, scale, window)),
                    "tflops": flops / (ms * 1e-3) / 1e12,
                }
            )
            if tokens == max(PREFILL_TOKENS) and not model.endswith("global"):
                time_configs(sweep, "prefill", shape, run, (default, *PREFILL_SWEEP[head_dim]))


def sdpa_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int
) -> functools.partial:
    """torch's fastest equivalent: flash for causal; a banded mask over expanded K/V otherwise."""
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention
    if not window:
        return functools.partial(sdpa, qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    pos = torch.arange(q.shape[0], device=DEVICE)
    delta = pos[:, None] - pos[None, :]
    mask = (delta >= 0) & (delta < window)
    return functools.partial(sdpa, qh, kh, vh, attn_mask=mask, scale=scale)


def graphed(fn: functools.partial) -> object:
    """Replay of `fn` captured in a CUDA graph: kernel time without Python launch overhead,
    what a decode step run as a graph sees."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_decode(
    rows: list[dict[str, object]], sweep: list[dict[str, object]], copy_bw: float
) -> None:
    for model, (n_q, n_kv, head_dim, window) in MODELS.items():
        scale = head_dim**-0.5
        for batch, context in DECODE:
            keys = [randn(context, n_kv, head_dim) for _ in range(batch)]
            values = [randn(context, n_kv, head_dim) for _ in range(batch)]
            cache = Paged(keys, values)
            q = randn(batch, n_q, head_dim)
            run = functools.partial(
                paged_attention_decode,
                q,
                *cache.pools,
                cache.seq_lens,
                scale,
                window,
                max_seq_len=context,
                out=torch.empty_like(q),
            )
            ours = run  # the default tiles, chosen per split length
            attended = min(context, window) if window else context
            kv_bytes = 2 * batch * attended * n_kv * head_dim * q.element_size()
            # SDPA on a contiguous [B, Hkv, keys, D] cache holding only the attended keys.
            kh, vh = (
                torch.stack(t).transpose(1, 2)[:, :, context - attended :].contiguous()
                for t in (keys, values)
            )
            sdpa = functools.partial(
                F.scaled_dot_product_attention, q.unsqueeze(2), kh, vh, scale=scale, enable_gqa=True
            )
            shape = f"{model} B={batch} ctx={context}"
            ms = median_ms(graphed(ours))
            rows.append(
                {
                    "op": "attn decode",
                    "shape": shape,
                    "ms": ms,
                    "torch_ms": median_ms(graphed(sdpa)),
                    "eager_ms": median_ms(ours),
                    "torch_eager_ms": median_ms(sdpa),
                    "gbps": kv_bytes / (ms * 1e-3) / 1e9,
                    "copy_share": kv_bytes / (ms * 1e-3) / copy_bw,
                }
            )
            if (batch, context) == (1, 4096) and not model.endswith("sliding"):
                configs = (default_decode_config(head_dim, DTYPE), *DECODE_SWEEP[head_dim])
                time_configs(sweep, "decode", shape, run, configs, as_graph=True)


def time_elementwise(rows: list[dict[str, object]], copy_bw: float) -> None:
    tokens, hidden, ffn = 2048, 4096, 14336

    def add(op: str, shape: str, nbytes: int, ms: float, torch_ms: float) -> None:
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append(
            {
                "op": op,
                "shape": shape,
                "ms": ms,
                "torch_ms": torch_ms,
                "gbps": gbps,
                "copy_share": gbps * 1e9 / copy_bw,
            }
        )

    x, residual, weight = (
        randn(tokens, hidden),
        torch.randn(tokens, hidden, device=DEVICE),
        randn(hidden),
    )

    def torch_add_norm() -> torch.Tensor:
        residual.add_(x)
        return ref_norm.rms_norm(residual, weight, 1e-5)

    add(
        "rms_norm+residual",
        f"[{tokens},{hidden}] bf16+f32",
        tokens * hidden * (2 + 8 + 4),
        median_ms(lambda: rms_norm(x, weight, 1e-5, residual=residual)),
        median_ms(torch_add_norm),
    )
    table = ref_rope.RopeTable(128, 500000.0, device=DEVICE)
    table.ensure(tokens)
    positions = torch.arange(tokens, device=DEVICE)
    q, k = randn(tokens, 32, 128), randn(tokens, 8, 128)

    def torch_rope() -> None:
        q.copy_(ref_rope.rotate(q, *table.angles(positions), table.rope_dim, False))
        k.copy_(ref_rope.rotate(k, *table.angles(positions), table.rope_dim, False))

    add(
        "rope q+k in place",
        f"T={tokens} 32+8 heads x128",
        2 * (q.numel() + k.numel()) * 2,
        median_ms(lambda: apply_rope(q, k, positions, table.cos, table.sin, False)),
        median_ms(torch_rope),
    )
    gate_up = randn(tokens, 2 * ffn)
    gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
    add(
        "gated silu",
        f"[{tokens},2x{ffn}]",
        3 * tokens * ffn * 2,
        median_ms(lambda: gated_activation(gate_up, None, "silu")),
        median_ms(lambda: ref_activation.gated_activation(gate, up, "silu")),
    )


def output_dir() -> Path:
    out = os.environ.get("OUT")
    path = Path(out) if out else Path(__file__).resolve().parent / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_table(
    checks: list[dict[str, object]],
    sweep: list[dict[str, object]],
    rows: list[dict[str, object]],
    copy_bw: float,
) -> None:
    for c in checks:
        flag = "ok  " if c["ok"] else "FAIL"
        print(f"{flag} {c['check']:<40} rel err {c['relative_error']:.2e} (< {c['bound']:.0e})")
    for s in sweep:
        ms = "n/a" if s["ms"] is None else f"{1e3 * s['ms']:8.1f} us"
        print(f"sweep {s['op']:<8} {s['shape']:<28} {s['config']} {ms}")
    print(f"\n{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print("decode rows: CUDA-graph replay times (eager: Python launches included)")
    print(
        f"{'op':<18} {'shape':<32} {'ours us':>8} {'torch us':>8} {'speedup':>7} {'rate':>16} "
        f"{'eager ours/torch us':>20}"
    )
    for r in rows:
        if "tflops" in r:
            rate = f"{r['tflops']:.1f} TFLOP/s"
        else:
            rate = f"{r['gbps']:.0f} GB/s {100 * r['copy_share']:.0f}%"
        eager = ""
        if "eager_ms" in r:
            eager = f"{1e3 * r['eager_ms']:.1f} / {1e3 * r['torch_eager_ms']:.1f}"
        print(
            f"{r['op']:<18} {r['shape']:<32} {1e3 * r['ms']:8.1f} {1e3 * r['torch_ms']:8.1f} "
            f"{r['torch_ms'] / r['ms']:6.2f}x {rate:>16} {eager:>20}"
        )


def main() -> int:
    torch.manual_seed(0)
    started = time.time()
    checks: list[dict[str, object]] = []
    check_elementwise(checks)
    check_attention(checks)
    copy_bw = copy_bandwidth()
    rows: list[dict[str, object]] = []
    sweep: list[dict[str, object]] = []
    time_elementwise(rows, copy_bw)
    time_prefill(rows, sweep)
    time_decode(rows, sweep, copy_bw)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "checks": checks,
        "timings": rows,
        "sweep": sweep,
        "seconds": time.time() - started,
    }
    (output_dir() / "gpu_ops.json").write_text(json.dumps(result, indent=2))
    print_table(checks, sweep, rows, copy_bw)
    print(f"total {time.time() - started:.0f} s")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
