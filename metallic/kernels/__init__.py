"""Triton kernels for CUDA; importing this package needs triton."""

from metallic.kernels.packing import KERNEL_TYPES, PackedWeight, gather_rows, prepare_weight
from metallic.kernels.quant_matmul import MAX_DECODE_M, dequantize_gpu, quant_matmul

__all__ = [
    "KERNEL_TYPES",
    "MAX_DECODE_M",
    "PackedWeight",
    "dequantize_gpu",
    "gather_rows",
    "prepare_weight",
    "quant_matmul",
]
