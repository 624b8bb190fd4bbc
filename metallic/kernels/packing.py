"""Load-time layouts of ggml weights for the GPU kernels, at the same bits per weight as the file.

The kernels read every quant through 16-byte loads, so each plane a kernel reads must start its
rows and blocks on 4-byte words. Q4_K (144-byte blocks) and Q5_K (176) already do and are used in
place, with no copy. Q4_0 (18), Q5_0 (22), Q8_0 (34) and Q6_K (210) do not: their blocks are split
into planes, one per field, each a contiguous [N, ...] tensor, byte for byte the block's field.

``PackedWeight.planes`` by type (nb = blocks per row):

- Q4_0: qs int32 [N, nb*4], d f16 [N, nb]
- Q5_0: qs int32 [N, nb*4], qh int32 [N, nb], d f16 [N, nb]
- Q8_0: qs int32 [N, nb*8], d f16 [N, nb]
- Q4_K: blocks int32 [N, nb*36], the same bytes as f16 [N, nb*72]
- Q5_K: blocks int32 [N, nb*44], the same bytes as f16 [N, nb*88]
- Q6_K: ql int32 [N, nb*32], qh int32 [N, nb*16], scales int8 [N, nb*16], d f16 [N, nb]
- F16, BF16: the matrix [N, K] in its own dtype
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from metallic.errors import MetallicError, UnsupportedTensorType
from metallic.quant.formats import block_format

T = GGMLQuantizationType

KERNEL_TYPES = (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16)

# Byte ranges (start, end) of each block field that becomes a plane, in plane order.
_SPLIT_FIELDS: dict[GGMLQuantizationType, tuple[tuple[int, int], ...]] = {
    T.Q4_0: ((2, 18), (0, 2)),
    T.Q5_0: ((6, 22), (2, 6), (0, 2)),
    T.Q8_0: ((2, 34), (0, 2)),
    T.Q6_K: ((0, 128), (128, 192), (192, 208), (208, 210)),
}
# The dtype each plane is read as, by its byte width: quants as words, scales as their own type.
_PLANE_DTYPES: dict[GGMLQuantizationType, tuple[torch.dtype, ...]] = {
    T.Q4_0: (torch.int32, torch.float16),
    T.Q5_0: (torch.int32, torch.int32, torch.float16),
    T.Q8_0: (torch.int32, torch.float16),
    T.Q6_K: (torch.int32, torch.int32, torch.int8, torch.float16),
}


@dataclass(frozen=True)
class PackedWeight:
    """An [n, k] matrix in a kernel layout (see the module docstring); build with prepare_weight."""

    ggml_type: GGMLQuantizationType
    n: int
    k: int
    planes: tuple[torch.Tensor, ...]

    @property
    def device(self) -> torch.device:
        return self.planes[0].device

    @property
    def nbytes(self) -> int:
        """Bytes on the device; equal to the GGUF tensor's size unless planes share storage."""
        if self.ggml_type in (T.Q4_K, T.Q5_K):
            return self.planes[0].numel() * 4
        return sum(p.numel() * p.element_size() for p in self.planes)


def check_shape(
    ggml_type: GGMLQuantizationType | int, n: int, k: int, tensor_name: str = "?"
) -> GGMLQuantizationType:
    """The type, once ``[n, k]`` is known to be a matrix the kernels can read in it."""
    fmt = block_format(ggml_type, tensor_name)
    if fmt.ggml_type not in KERNEL_TYPES:
        raise UnsupportedTensorType(f"{fmt.name} (no GPU kernel)", tensor_name)
    if n <= 0 or k <= 0 or k % fmt.block_size:
        raise MetallicError(
            f"tensor {tensor_name}: a [{n}, {k}] {fmt.name} matrix needs rows of whole "
            f"{fmt.block_size}-element blocks"
        )
    return fmt.ggml_type


def prepare_weight(
    raw: torch.Tensor,
    ggml_type: GGMLQuantizationType | int,
    n: int,
    k: int,
    *,
    tensor_name: str = "?",
) -> PackedWeight:
    """Lay out the raw GGUF bytes of an [n, k] matrix for the kernels, on ``raw``'s device.

    Q4_K, Q5_K, F16 and BF16 are viewed in place when ``raw`` is contiguous and 4-byte aligned;
    the other types are copied once into planes of the same total size. ``tensor_name`` names
    the tensor in errors.
    """
    qtype = check_shape(ggml_type, n, k, tensor_name)
    fmt = block_format(qtype)
    nbytes = n * (k // fmt.block_size) * fmt.type_size
    if raw.dtype != torch.uint8 or raw.numel() != nbytes:
        raise MetallicError(
            f"tensor {tensor_name}: a [{n}, {k}] {fmt.name} matrix is {nbytes} bytes of uint8, "
            f"got {raw.numel()} of {raw.dtype}"
        )
    raw = raw.reshape(-1)
    if not raw.is_contiguous() or raw.data_ptr() % 4:
        raw = raw.clone()
    if qtype in (T.F16, T.BF16):
        dtype = torch.float16 if qtype == T.F16 else torch.bfloat16
        return PackedWeight(qtype, n, k, (raw.view(dtype).view(n, k),))
    if qtype in (T.Q4_K, T.Q5_K):
        words = raw.view(torch.int32).view(n, -1)
        return PackedWeight(qtype, n, k, (words, raw.view(torch.float16).view(n, -1)))
    blocks = raw.view(n, k // fmt.block_size, fmt.type_size)
    planes = tuple(
        blocks[:, :, start:end].contiguous().view(dtype).view(n, -1)
        for (start, end), dtype in zip(_SPLIT_FIELDS[qtype], _PLANE_DTYPES[qtype], strict=True)
    )
    return PackedWeight(qtype, n, k, planes)


def gather_rows(weight: PackedWeight, rows: torch.Tensor) -> PackedWeight:
    """The matrix made of ``rows`` of ``weight``, still in blocks (every plane is [N, ...]), on
    the rows' device: an embedding lookup reads only its tokens' blocks, and `dequantize_gpu`
    widens just those. A weight in pinned host memory (under a device budget) is read there by
    the GPU (`host_rows`)."""

    def pick(plane: torch.Tensor) -> torch.Tensor:
        if plane.device == rows.device:
            return plane[rows]
        from metallic.kernels.host_rows import gather_host_rows

        return gather_host_rows(plane, rows)

    if weight.ggml_type in (T.Q4_K, T.Q5_K):  # one byte plane seen as words and as f16
        words = pick(weight.planes[0])
        planes: tuple[torch.Tensor, ...] = (words, words.view(torch.float16))
    else:
        planes = tuple(pick(p) for p in weight.planes)
    return PackedWeight(weight.ggml_type, rows.shape[0], weight.k, planes)


def row_slice(weight: PackedWeight, start: int, end: int) -> PackedWeight:
    """Rows [start, end) of ``weight``: views, since every plane is [N, ...] row-major."""
    planes = tuple(p[start:end] for p in weight.planes)
    return PackedWeight(weight.ggml_type, end - start, weight.k, planes)
