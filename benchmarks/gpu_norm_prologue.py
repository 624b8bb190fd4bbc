"""The FMA mode's RMS-norm prologue (quant_matmul with a NormInput) against the two launches it
replaces (kernels.norm's rms_norm, then quant_matmul), at Gemma 3 270M's decode shapes.

Chains, one decode row, bf16 activations, f32 residual, post-norm and norm weights near 1:

- attn: Gemma's q|k (Q5_0 [1280, 640]) and v (Q8_0 [256, 640]) after the block before:
  norm + q|k + v (3 launches) against q|k + v each making x (2; q|k's stores the residual);
- ffn: gate|up (Q5_0 [4096, 640], GeGLU in the epilogue): norm + gate|up against one launch;
- first: layer 0's norm of the embedding (no post-norm, no residual) + q|k against q|k alone.

Correctness first, on every chain: the fused products and new residual against the two-launch
results. Bitwise is the goal (and what the interpreter gives); on the GPU the prologue's sums
over the row may reduce in another order than the norm kernel's, so a last-bit difference of a
norm scalar is tolerated: the residual within 2 f32 ulps of its largest element, each output
within one bf16 ulp of its value plus 2**-10 of the largest output. The table says how many
elements differ at all. Then timing: each chain's launches captured back to back in a CUDA graph
(benchmarks/gpu_quant_matmul.py's graph_us), rotating over weight copies as a decode step's
layers would, median microseconds per chain.

GPU:   python benchmarks/gpu_norm_prologue.py                       (JSON to $OUT)
CPU:   TRITON_INTERPRET=1 python benchmarks/gpu_norm_prologue.py --smoke   (small shapes,
       correctness only, bitwise)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from gpu_quant_matmul import graph_us, random_blocks

from metallic.kernels import NormInput, PackedWeight, prepare_weight, quant_matmul
from metallic.kernels.norm import rms_norm

T = GGMLQuantizationType
EPS = 1e-6
COPIES = 8  # weight copies a chain rotates over (Gemma's 18 layers each have their own)
REPS = 32  # chains per graph


@dataclass(frozen=True)
class Chain:
    """Products that share one normed input: (format, rows) parts, gated or not."""

    name: str
    k: int
    parts: tuple[tuple[GGMLQuantizationType, int], ...]
    gated: str | None = None
    residual: bool = True  # a block's output added to the residual stream, post-normed first


def chains(smoke: bool) -> list[Chain]:
    if smoke:
        return [
            Chain("attn", 256, ((T.Q5_0, 64), (T.Q8_0, 32))),
            Chain("ffn", 256, ((T.Q5_0, 128),), "gelu_tanh"),
            Chain("first", 256, ((T.Q5_0, 64),), residual=False),
        ]
    return [
        Chain("attn", 640, ((T.Q5_0, 1280), (T.Q8_0, 256))),
        Chain("ffn", 640, ((T.Q5_0, 4096),), "gelu_tanh"),
        Chain("first", 640, ((T.Q5_0, 1280),), residual=False),
    ]


@dataclass
class Operands:
    delta: torch.Tensor  # the block's output (bf16), or the f32 embedding row
    x: torch.Tensor | None  # the residual stream, f32
    pre_weight: torch.Tensor | None
    weight: torch.Tensor


def operands(chain: Chain, gen: torch.Generator) -> Operands:
    device, k = gen.device, chain.k
    dtype = torch.bfloat16 if chain.residual else torch.float32
    delta = (torch.randn(1, k, device=device, generator=gen) * 3).to(dtype)
    x = torch.randn(1, k, device=device, generator=gen) * 5 if chain.residual else None
    pre = 1 + 0.2 * torch.randn(k, device=device, generator=gen) if chain.residual else None
    weight = 1 + 0.2 * torch.randn(k, device=device, generator=gen)
    return Operands(delta, x, pre, weight)


def packed_parts(chain: Chain, gen: torch.Generator) -> list[PackedWeight]:
    return [
        prepare_weight(random_blocks(q, n, chain.k, gen), q, n, chain.k) for q, n in chain.parts
    ]


def widths(chain: Chain) -> list[int]:
    return [n // 2 if chain.gated else n for _, n in chain.parts]


def separate_chain(
    chain: Chain, ops: Operands, parts: list[PackedWeight], x: torch.Tensor | None
) -> Callable[[], torch.Tensor]:
    """The norm launch (updating x in place), then each part's product of its result."""
    out = torch.empty(1, sum(widths(chain)), dtype=torch.bfloat16, device=ops.delta.device)

    def run() -> torch.Tensor:
        h = rms_norm(ops.delta, ops.weight, EPS, x, torch.bfloat16, ops.pre_weight)
        first = 0
        for p, width in zip(parts, widths(chain), strict=True):
            cols = out[:, first : first + width]
            quant_matmul(h, p, p.ggml_type, p.n, p.k, out=cols, gated=chain.gated)
            first += width
        return out

    return run


def fused_chain(
    chain: Chain, ops: Operands, parts: list[PackedWeight], new_x: torch.Tensor | None
) -> Callable[[], torch.Tensor]:
    """Each part's product making x itself; the first stores the new residual."""
    out = torch.empty(1, sum(widths(chain)), dtype=torch.bfloat16, device=ops.delta.device)
    norms = [
        NormInput(ops.delta, ops.weight, EPS, torch.bfloat16, ops.x, ops.pre_weight, stores)
        for stores in [new_x] + [None] * (len(parts) - 1)
    ]

    def run() -> torch.Tensor:
        first = 0
        for p, norm, width in zip(parts, norms, widths(chain), strict=True):
            cols = out[:, first : first + width]
            quant_matmul(norm, p, p.ggml_type, p.n, p.k, out=cols, gated=chain.gated)
            first += width
        return out

    return run


def compare(chain: Chain, gen: torch.Generator, failures: list[str]) -> dict[str, object]:
    """Fused against separate on fresh operands: differing elements, and the tolerance."""
    ops = operands(chain, gen)
    parts = packed_parts(chain, gen)
    before = None if ops.x is None else ops.x.clone()
    updated = None if ops.x is None else ops.x.clone()
    new_x = None if ops.x is None else torch.full_like(ops.x, float("nan"))
    ref = separate_chain(chain, ops, parts, updated)().float()
    got = fused_chain(chain, ops, parts, new_x)().float()
    row: dict[str, object] = {"chain": chain.name, "k": chain.k, "outputs": ref.numel()}
    row["out_diff"] = int((got != ref).sum())
    bound = ref.abs() * 2.0**-7 + ref.abs().max() * 2.0**-10
    exact = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.isfinite(got).all() or (got - ref).abs().gt(bound).any():
        failures.append(f"{chain.name}: outputs beyond one bf16 ulp")
    elif exact and row["out_diff"]:
        failures.append(f"{chain.name}: {row['out_diff']} outputs differ in the interpreter")
    if new_x is not None and updated is not None and before is not None:
        row["residual_diff"] = int((new_x != updated).sum())
        if not torch.equal(ops.x, before):
            failures.append(f"{chain.name}: the fused products wrote the old residual")
        limit = 2 * torch.finfo(torch.float32).eps * updated.abs().max()
        if not (new_x - updated).abs().max() <= limit:
            failures.append(f"{chain.name}: new residual beyond 2 f32 ulps")
        elif exact and row["residual_diff"]:
            failures.append(f"{chain.name}: residual differs in the interpreter")
    return row


def time_chain(chain: Chain, gen: torch.Generator, row: dict[str, object]) -> None:
    ops = operands(chain, gen)
    copies = [packed_parts(chain, gen) for _ in range(COPIES)]
    new_x = None if ops.x is None else torch.empty_like(ops.x)
    separate = [separate_chain(chain, ops, parts, ops.x) for parts in copies]
    fused = [fused_chain(chain, ops, parts, new_x) for parts in copies]
    row["separate_launches"] = 1 + len(chain.parts)
    row["fused_launches"] = len(chain.parts)
    row["separate_us"] = graph_us([separate[i % COPIES] for i in range(REPS)])
    row["fused_us"] = graph_us([fused[i % COPIES] for i in range(REPS)])


def print_table(rows: list[dict[str, object]]) -> None:
    print(f"\n{'chain':<7}{'K':>5}{'diff out':>9}{'diff res':>9}{'sep us':>8}{'fused us':>9}"
          f"{'saved us':>9}")  # fmt: skip
    for r in rows:
        sep, fused = r.get("separate_us"), r.get("fused_us")
        times = "" if sep is None else f"{sep:>8.2f}{fused:>9.2f}{sep - fused:>9.2f}"
        print(f"{r['chain']:<7}{r['k']:>5}{r['out_diff']:>9}{r.get('residual_diff', '-'):>9}"
              f"{times}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes, correctness only")
    args = parser.parse_args()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not (args.smoke and interpreted):
        print(
            "this benchmark needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr
        )
        return 2
    started = time.time()
    device = "cpu" if interpreted else "cuda"
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures: list[str] = []
    rows = [compare(chain, gen, failures) for chain in chains(args.smoke)]
    print(f"correctness: {len(failures)} failures ({time.time() - started:.0f} s)", flush=True)
    if not args.smoke:
        for chain, row in zip(chains(args.smoke), rows, strict=True):
            time_chain(chain, gen, row)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)",
        "torch": torch.__version__,
        "rows": rows,
        "failures": failures,
        "seconds": time.time() - started,
    }
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_norm_prologue.json"
    path.write_text(json.dumps(result, indent=1))
    for failure in failures:
        print("FAIL", failure)
    print_table(rows)
    print(f"{len(failures)} check failures; {time.time() - started:.0f} s; JSON at {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
