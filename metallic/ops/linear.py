"""Matrix products against weights kept as the device prefers them.

Two forms: dense (dequantized once at load into the compute dtype; the CPU path) and native (the
GGUF blocks themselves, laid out for the Triton kernels, which dequantize in registers).
Matrices that share an input (q|k|v, gate|up) are stacked into one weight so a step makes one
pass: dense parts are concatenated once at load; native parts are merged per run of one format
(the loader's job) and each remaining block matrix writes its own output columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from metallic.ops.dispatch import use_kernels

if TYPE_CHECKING:  # the kernels need triton, which CPU-only installs may lack
    from metallic.kernels import PackedWeight


@dataclass
class LinearWeight:
    """An [out, in] matrix made of one or more stacked row blocks ("parts"), plus bias.

    Exactly one of `dense` (the whole matrix) and `native` (one kernel layout per part) is set."""

    ggml_types: tuple[GGMLQuantizationType, ...]
    part_rows: tuple[int, ...]
    in_features: int
    dense: torch.Tensor | None = None  # [out, in] in the compute dtype
    native: tuple[PackedWeight, ...] | None = None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return sum(self.part_rows)

    @property
    def nbytes(self) -> int:
        """Device bytes of the matrix (dense, or the blocks as the kernels hold them) and bias."""
        held = sum(p.nbytes for p in self.native or ())
        for t in (self.dense, self.bias):
            held += 0 if t is None else t.numel() * t.element_size()
        return held


def stack(parts: Sequence[LinearWeight]) -> LinearWeight:
    """One weight computing every part's output side by side."""
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("cannot stack weights where only some have a bias")
    dense = [p.dense for p in parts if p.dense is not None]
    if dense and len(dense) != len(parts):
        raise ValueError("cannot stack dense and native weights")
    return LinearWeight(
        ggml_types=sum((p.ggml_types for p in parts), ()),
        part_rows=sum((p.part_rows for p in parts), ()),
        in_features=parts[0].in_features,
        dense=torch.cat(dense) if len(dense) == len(parts) else None,
        native=None if dense else sum((p.native or () for p in parts), ()),
        bias=None if biases[0] is None else torch.cat(biases),  # type: ignore[arg-type]
    )


def linear(
    x: torch.Tensor,
    weight: LinearWeight,
    widen_limit: int | None = None,
    rounded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """`x @ W.T + b` with x [..., in]; the result keeps x's dtype. `widen_limit`: the most
    bytes a native matrix may be widened into at once (see `_native_linear`). `rounded`: x
    already rounded for the dp4a kernels (`rounding_buffers`, filled by the op before)."""
    if weight.dense is not None:
        w = weight.dense
        rows = x.numel() // x.shape[-1]
        if w.device.type == "cpu" and w.dtype == torch.float16 and rows >= MIN_WIDENED_ROWS:
            out = _widened_linear(x.reshape(rows, -1).float(), w).view(*x.shape[:-1], -1)
        else:
            out = F.linear(x.to(w.dtype), w)
    else:
        rows = x.reshape(-1, weight.in_features)
        out = _native_linear(rows, weight.native or (), widen_limit, rounded)
        out = out.view(*x.shape[:-1], weight.out_features)
    if weight.bias is not None:
        out = out + weight.bias.to(out.dtype)
    return out.to(x.dtype)


# CPU f16 products without native f16 arithmetic cost each row a pass over the weight (a
# matrix-vector loop, with x rounded to f16). From two rows (a prompt chunk, a batch of decodes)
# the weight is widened to f32 instead, a slice at a time (one conversion pass, then an f32 GEMM
# per slice while the slice is in cache): rows computed together or apart then get the same f32
# arithmetic, and 16 rows against Gemma's 262144x640 output take 213 ms instead of 446 (2 cores;
# widening it whole took 629).
MIN_WIDENED_ROWS = 2
_WIDEN_BYTES = 4 << 20  # f32 bytes of one widened slice


def _widened_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, in] f32 times an f16 weight widened a slice of rows at a time."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    step = max(64, _WIDEN_BYTES // (4 * w.shape[1]))
    for first in range(0, w.shape[0], step):
        out[:, first : first + step] = F.linear(x, w[first : first + step].float())
    return out


def native_path(m: int, parts: Sequence[PackedWeight], dtype: torch.dtype = torch.bfloat16) -> str:
    """How `_native_linear` multiplies m rows of x (in `dtype`) by the stacked parts:

    - ``"dp4a"``: up to DP4A_MAX_ROWS rows (decode steps of a few sequences) against large
      K-quants and Q8_0/Q5_0/Q4_0 (`quant_gemv.uses_dp4a`): x rounded to int8
      once, the dp4a kernels, which read the weights once for all rows (each row's result the
      same bits whatever the other rows);
    - ``"gemm"``: rows where some part takes the tensor-core GEMM (`quant_gemm.uses_gemm`:
      large Q4_K parts, prompt chunks and batches from 64 rows): those parts run quant_gemm,
      which dequantizes its tiles in registers, each writing its own columns; the other parts
      are widened one at a time;
    - ``"fused"``: a few rows, or up to MAX_FUSED_M rows against a large matrix
      (`kernels.fuses`): each part's fused kernel (quant_matmul) reads its blocks once per tile
      of rows and writes its own output columns;
    - ``"dequantize"``: otherwise every part is widened into one scratch matrix, then a single
      dense product (one cuBLAS call for q|k|v whatever their formats).
    """
    from metallic.kernels import fuses
    from metallic.kernels.quant_gemm import uses_gemm
    from metallic.kernels.quant_gemv import uses_dp4a

    if uses_dp4a(parts, m, dtype):
        return "dp4a"
    if uses_gemm(m, parts, dtype):
        return "gemm"
    return "fused" if fuses(m, sum(p.nbytes for p in parts), dtype) else "dequantize"


def rounding_buffers(
    n_rows: int, weight: LinearWeight, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, ...] | None:
    """Buffers for x rounded to int8 where `linear(x, weight)` with `n_rows` rows of x in
    `dtype` would round it for the dp4a kernels (`quant_gemv.uses_dp4a`), so the op that makes
    x can round it in the same launch; None where the product takes another path."""
    if weight.native is None or native_path(n_rows, weight.native, dtype) != "dp4a":
        return None
    from metallic.kernels.rounding import empty_quantized_x

    return empty_quantized_x(weight.in_features, weight.native[0].device, n_rows)


def fuses_gate(
    x: torch.Tensor, weight: LinearWeight, act_rounded: tuple[torch.Tensor, ...] | None = None
) -> bool:
    """Whether `gated_linear` can multiply x by a gated MLP's [gate | up] with the activation
    applied in the product's own kernel: one row against a single part of block quants on the
    fused path (`quant_matmul.fuses_gate`), no bias, and no rounding of the result wanted for a
    dp4a product after (`act_rounded`, from `rounding_buffers`)."""
    native = weight.native
    if act_rounded is not None or native is None or weight.bias is not None or len(native) != 1:
        return False
    if not use_kernels(x) or x.numel() != x.shape[-1]:
        return False
    from metallic.kernels.quant_matmul import fuses_gate as kernel_fuses_gate

    return native_path(1, native, x.dtype) == "fused" and kernel_fuses_gate(
        1, native[0].ggml_type, native[0].n
    )


def gated_linear(x: torch.Tensor, weight: LinearWeight, kind: str) -> torch.Tensor:
    """`gated_activation(linear(x, weight), None, kind)` in one launch, where `fuses_gate`:
    [..., F] for a [gate | up] weight of 2F rows, bit for bit."""
    from metallic.kernels import quant_matmul

    (part,) = weight.native or ()
    out = quant_matmul(x.reshape(1, -1), part, part.ggml_type, part.n, part.k, gated=kind)
    return out.view(*x.shape[:-1], part.n // 2)


def _native_linear(
    rows: torch.Tensor,
    parts: tuple[PackedWeight, ...],
    widen_limit: int | None = None,
    rounded: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """rows [M, in] times the stacked parts, by native_path. Where the dequantize path would
    widen more than `widen_limit` bytes, it widens slices of rows of at most that size in turn
    (a device budget bounds the scratch: the 8B's output matrix in f32 is 2 GiB), as the gemm
    path does for the parts it widens."""
    from metallic.kernels import dequantize_gpu, quant_matmul
    from metallic.kernels.quant_gemv import gemv_parts, quantize_x

    n_total = sum(p.n for p in parts)
    path = native_path(rows.shape[0], parts, rows.dtype)
    row_bytes = rows.shape[1] * rows.element_size()
    if path == "dequantize" and (widen_limit is None or n_total * row_bytes <= widen_limit):
        dense = torch.empty(n_total, rows.shape[1], dtype=rows.dtype, device=rows.device)
        first = 0
        for p in parts:
            dequantize_gpu(p, p.ggml_type, p.n, p.k, out=dense[first : first + p.n])
            first += p.n
        return rows @ dense.T
    if path in ("dequantize", "gemm"):
        step = max(p.n for p in parts) if widen_limit is None else widen_limit // row_bytes
        return _sliced_linear(rows, parts, max(1, step), gemm=path == "gemm")
    out = torch.empty(rows.shape[0], n_total, dtype=rows.dtype, device=rows.device)
    if path == "dp4a":  # x's rows rounded once for all parts (by the op before, or here)
        x8 = rounded if rounded is not None else quantize_x(rows)
        return gemv_parts(x8, parts, out)
    first = 0
    for p in parts:
        cols = out[:, first : first + p.n]
        quant_matmul(rows, p, p.ggml_type, p.n, p.k, out=cols)
        first += p.n
    return out


def _sliced_linear(
    rows: torch.Tensor, parts: tuple[PackedWeight, ...], step: int, gemm: bool = False
) -> torch.Tensor:
    """rows [M, in] times the stacked parts, widening at most `step` rows of a part at a time
    into one reused scratch matrix; with `gemm`, the parts that take quant_gemm at M rows
    (`quant_gemm.gemm_takes`) run it instead, widening nothing."""
    from metallic.kernels import dequantize_gpu
    from metallic.kernels.packing import row_slice
    from metallic.kernels.quant_gemm import gemm_takes, quant_gemm

    m = rows.shape[0]
    out = torch.empty(m, sum(p.n for p in parts), dtype=rows.dtype, device=rows.device)
    fused = [gemm and gemm_takes(m, p, rows.dtype) for p in parts]
    widened = [p.n for p, f in zip(parts, fused, strict=True) if not f]
    scratch = None
    if widened:
        scratch = torch.empty(min(step, max(widened)), rows.shape[1], dtype=rows.dtype,
                              device=rows.device)  # fmt: skip
    first = 0
    for p, f in zip(parts, fused, strict=True):
        if f:
            quant_gemm(rows, p, out=out[:, first : first + p.n])
            first += p.n
            continue
        assert scratch is not None
        for start in range(0, p.n, step):
            end = min(p.n, start + step)
            dense = scratch[: end - start]
            dequantize_gpu(row_slice(p, start, end), p.ggml_type, end - start, p.k, out=dense)
            out[:, first + start : first + end] = rows @ dense.T
        first += p.n
    return out


def embed(tokens: torch.Tensor, weight: LinearWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `tokens` of the matrix, in `dtype`: a lookup that widens only those rows."""
    if weight.dense is not None:
        return weight.dense[tokens].to(dtype)
    from metallic.kernels import dequantize_gpu, gather_rows

    (packed,) = weight.native or ()
    rows = gather_rows(packed, tokens)
    return dequantize_gpu(rows, rows.ggml_type, rows.n, rows.k, dtype)
