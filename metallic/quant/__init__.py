"""ggml block formats: their layouts, a torch dequantizer and a numpy quantizer."""

from metallic.quant.formats import FORMATS, BlockFormat, block_format, tensor_nbytes
from metallic.quant.quantize import quantize
from metallic.quant.reference import dequantize, dequantize_rows

__all__ = [
    "FORMATS",
    "BlockFormat",
    "block_format",
    "dequantize",
    "dequantize_rows",
    "quantize",
    "tensor_nbytes",
]
