"""Triton kernels for CUDA; importing this package needs triton."""

from metallic.kernels.packing import KERNEL_TYPES, PackedWeight, gather_rows, prepare_weight
from metallic.kernels.quant_matmul import (
    MAX_FUSED_M,
    DotTile,
    dequantize_gpu,
    dot_tile,
    fuses,
    quant_matmul,
)

__all__ = [
    "KERNEL_TYPES",
    "MAX_FUSED_M",
    "DotTile",
    "PackedWeight",
    "dequantize_gpu",
    "dot_tile",
    "fuses",
    "gather_rows",
    "prepare_weight",
    "quant_matmul",
]
