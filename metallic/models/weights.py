"""Map a GGUF file's tensors onto the transformer's weights, one layer at a time.

Tensor names follow llama.cpp's conventions (`blk.N.attn_q.weight`, ...), the same for every family;
which optional tensors must exist is decided by the config (biases for qwen2, QK norms for qwen3 and
gemma3, the sandwich norms of gemma).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch
from gguf import GGMLQuantizationType

from metallic.errors import GGUFError, MetallicError
from metallic.gguf.config import ModelConfig
from metallic.gguf.reader import GGUFFile, TensorInfo
from metallic.ops.linear import LinearWeight, stack
from metallic.quant.formats import block_format, tensor_nbytes
from metallic.quant.reference import dequantize_rows
from metallic.quant.transcode import held_types, to_q8_0
from metallic.runtime.staging import StagingRing


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: LinearWeight  # q | k | v stacked
    o: LinearWeight
    ffn_norm: torch.Tensor
    gate_up: LinearWeight  # gate | up stacked
    down: LinearWeight
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embedding: LinearWeight  # [vocab, hidden]; the same object as `output` when tied
    output: LinearWeight
    output_norm: torch.Tensor
    layers: list[LayerWeights]
    rope_freqs: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held for weights (a tied embedding counted once)."""
        linears = [self.output] + [w for layer in self.layers for w in _linears(layer)]
        if self.embedding is not self.output:
            linears.append(self.embedding)
        vectors = [self.output_norm, self.rope_freqs] + [
            v for layer in self.layers for v in vars(layer).values() if isinstance(v, torch.Tensor)
        ]
        return sum(w.nbytes for w in linears) + sum(_size(v) for v in vectors)


Part = TypeVar("Part", LayerWeights, ModelWeights)


def tensors_of(part: LayerWeights | ModelWeights) -> list[torch.Tensor]:
    """Every tensor a layer holds (or the non-layer weights: embedding, output, norms), in a
    fixed order that `with_tensors` takes back; a tied matrix counts once."""
    found: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    _map_tensors(part, record)
    return found


def linear_tensors(weight: LinearWeight) -> list[torch.Tensor]:
    """The tensors of one matrix (its native planes, or dense values; and bias), the same
    objects `tensors_of` lists for the part that holds it."""
    planes = [plane for packed in weight.native or () for plane in packed.planes]
    return [*planes, *(t for t in (weight.dense, weight.bias) if t is not None)]


def with_tensors(part: Part, tensors: list[torch.Tensor]) -> Part:
    """`part` with its tensors replaced, in `tensors_of` order, by `tensors` (views of the same
    values elsewhere: a memory-pool block, a streaming slot, or a host buffer)."""
    supply = iter(tensors)
    return _map_tensors(part, lambda _: next(supply))


def formats(part: LayerWeights | ModelWeights) -> str:
    """The ggml formats of its matrices, for the memory pool's records."""
    names = {
        t.name
        for f in fields(part)
        if isinstance(value := getattr(part, f.name), LinearWeight)
        for t in value.ggml_types
    }
    return "+".join(sorted(names))


def _map_tensors(part: Part, fn: Callable[[torch.Tensor], torch.Tensor]) -> Part:
    """`part` rebuilt with `fn` applied to each tensor; the layer list of ModelWeights is left
    as it is, and a matrix held twice (a tied embedding) is mapped once and stays shared."""

    def swap(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else fn(t)

    mapped: dict[int, LinearWeight] = {}
    changes: dict[str, object] = {}
    for f in fields(part):
        value = getattr(part, f.name)
        if isinstance(value, list):
            continue
        if not isinstance(value, LinearWeight):
            changes[f.name] = swap(value)
            continue
        if id(value) not in mapped:
            native = value.native
            if native is not None:
                native = tuple(
                    replace(p, planes=tuple(fn(plane) for plane in p.planes)) for p in native
                )
            mapped[id(value)] = replace(
                value, dense=swap(value.dense), native=native, bias=swap(value.bias)
            )
        changes[f.name] = mapped[id(value)]
    return replace(part, **changes)


def _linears(layer: LayerWeights) -> list[LinearWeight]:
    return [v for v in vars(layer).values() if isinstance(v, LinearWeight)]


def _size(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class WeightLoader:
    """Turns mapped tensors into device weights: dense in the compute dtype, or (`native`) the
    GGUF blocks themselves for the Triton kernels, where the kernels know every part's format."""

    def __init__(
        self,
        gguf: GGUFFile,
        device: torch.device,
        dtype: torch.dtype,
        native: bool = False,
        staging: StagingRing | None = None,
    ) -> None:
        self.gguf = gguf
        self.device = device
        self.dtype = dtype
        self.native = native
        self.staging = staging or StagingRing(device)

    def _info(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        info = self.gguf.tensor(name)
        try:
            block_format(info.ggml_type, name)
        except MetallicError as err:
            raise GGUFError(self.gguf.path, str(err)) from None
        if shape is not None and info.shape != shape:
            raise GGUFError(
                self.gguf.path, f"tensor {name} has shape {info.shape}, expected {shape}"
            )
        return info

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def vector(self, name: str) -> torch.Tensor:
        """A norm weight or bias: always float32 (tiny, and precision matters there)."""
        info = self._info(name)
        return dequantize_rows(info.raw_bytes(), info.ggml_type, info.shape).to(self.device)

    def dense(
        self, name: str, rows: int, cols: int, dtype: torch.dtype | None = None
    ) -> LinearWeight:
        """A matrix dequantized into `dtype` (default: the compute dtype)."""
        info = self._info(name, (rows, cols))
        values = dequantize_rows(
            info.raw_bytes(),
            info.ggml_type,
            info.shape,
            dtype=dtype or self.dtype,
            tensor_name=name,
        )
        return LinearWeight((info.ggml_type,), (rows,), cols, dense=values.to(self.device))

    def linear(self, parts: list[tuple[str, int, str | None]], cols: int) -> LinearWeight:
        """Matrices sharing an input, stacked: `parts` are (name, rows, bias name or None).

        Native only when the kernels know every part's format, so a stack is never half of each;
        consecutive native parts of one format become one block matrix (one kernel launch)."""
        infos = [self._info(name, (rows, cols)) for name, rows, _ in parts]
        biases = [self.vector(bias) if bias else None for _, _, bias in parts]
        if not (self.native and all(i.ggml_type in _kernel_types() for i in infos)):
            weights = [self.dense(name, rows, cols) for name, rows, _ in parts]
            for weight, bias in zip(weights, biases, strict=True):
                weight.bias = bias
            return stack(weights) if len(weights) > 1 else weights[0]
        from metallic.kernels import prepare_weight

        packed = []
        held = held_types(tuple(i.ggml_type for i in infos), sum(math.prod(i.shape) for i in infos))
        for qtype, run in itertools.groupby(zip(held, infos, strict=True), key=lambda p: p[0]):
            run = [info for _, info in run]
            raw = self._upload(run, qtype)
            rows = sum(info.shape[0] for info in run)
            name = "+".join(info.name for info in run)
            packed.append(prepare_weight(raw, qtype, rows, cols, tensor_name=name))
        return LinearWeight(
            ggml_types=tuple(info.ggml_type for info in infos),
            part_rows=tuple(rows for _, rows, _ in parts),
            in_features=cols,
            native=tuple(packed),
            bias=None if biases[0] is None else torch.cat(biases),  # type: ignore[arg-type]
        )

    def _upload(self, infos: list[TensorInfo], held: GGMLQuantizationType) -> torch.Tensor:
        """The tensors' bytes back to back on the device in the `held` format, straight from
        the map through the staging ring (a stack is assembled on the device, never copied on
        the host; a part in another format is widened there, see quant.transcode)."""
        if len(infos) == 1 and infos[0].ggml_type == held:
            return self.staging.upload(infos[0].raw_bytes())
        sizes = [held_bytes(info, held) for info in infos]
        out = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        first = 0
        for info, size in zip(infos, sizes, strict=True):
            if info.ggml_type == held:
                self.staging.upload(info.raw_bytes(), out[first : first + size])
            else:
                raw = self.staging.upload(info.raw_bytes())
                out[first : first + size] = to_q8_0(raw, info.ggml_type)
            first += size
        return out

    def matrix(self, name: str, rows: int, cols: int, dense_dtype: torch.dtype) -> LinearWeight:
        """A matrix used alone (embedding, output): native when the kernels read its format,
        else dense in `dense_dtype`."""
        return (
            self.linear([(name, rows, None)], cols)
            if self.native
            else self.dense(name, rows, cols, dtype=dense_dtype)
        )


# Matrices of a layer that share an input and are stacked into one weight (see load_weights).
STACKS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def held_bytes(info: TensorInfo, held: GGMLQuantizationType) -> int:
    """Bytes of a native matrix kept in the `held` format (quant.transcode)."""
    return info.n_bytes if info.ggml_type == held else tensor_nbytes(held, math.prod(info.shape))


def _kernel_types() -> tuple[GGMLQuantizationType, ...]:
    from metallic.kernels import KERNEL_TYPES  # needs triton: imported only for native weights

    return KERNEL_TYPES


def estimate_bytes(
    gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype, native: bool
) -> tuple[int, list[int]]:
    """(bytes of the non-layer weights, bytes of each layer) as `load_weights` will hold them:
    a memory plan is made before anything is loaded."""
    kernel_types = _kernel_types() if native else ()
    held: dict[str, GGMLQuantizationType] = {}  # native matrices kept in another format
    for i in range(config.n_layers):
        for kinds in STACKS:
            infos = [gguf.tensors.get(f"blk.{i}.{kind}.weight") for kind in kinds]
            found = [info for info in infos if info is not None]
            types = tuple(info.ggml_type for info in found)
            if len(types) == len(kinds) and all(t in kernel_types for t in types):
                kept = held_types(types, sum(math.prod(info.shape) for info in found))
                held |= {info.name: t for info, t in zip(found, kept, strict=True)}

    def size(name: str) -> int:
        info = gguf.tensor(name)
        if len(info.shape) == 1:
            return info.shape[0] * 4  # vectors are kept in f32
        if info.ggml_type in kernel_types:
            return held_bytes(info, held.get(name, info.ggml_type))
        return info.shape[0] * info.shape[1] * dtype.itemsize

    layers = [0] * config.n_layers
    fixed = 0
    for name in gguf.tensors:
        if not name.startswith("blk."):
            fixed += size(name)
        elif (i := int(name.split(".")[1])) < config.n_layers:  # others are never loaded
            layers[i] += size(name)
    return fixed, layers


def host_embedding_bytes(gguf: GGUFFile, native: bool) -> int:
    """Bytes of an embedding matrix that a device budget can leave in host memory (where the GPU
    reads its rows): one the kernels read natively and the output does not share; else 0."""
    info = gguf.tensor("token_embd.weight")
    if native and "output.weight" in gguf.tensors and info.ggml_type in _kernel_types():
        return info.n_bytes
    return 0


def load_weights(
    gguf: GGUFFile,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
    *,
    vocab_dtype: torch.dtype | None = None,
    native: bool = False,
    staging: StagingRing | None = None,
    on_host: Callable[[int], bool] = lambda _: False,
    adopt: Callable[[str, Any], Any] = lambda _, part: part,
    build_on_host: bool = False,
) -> ModelWeights:
    """Build every layer's weights; `progress(done, total)` is called after each layer.

    `vocab_dtype` overrides `dtype` for the (largest) embedding/output matrix when it is dense;
    `native` keeps every matrix the kernels can read in its GGUF blocks; layers for which
    `on_host(i)` holds stay in host memory (to be packed for streaming). `adopt(name, part)` is
    handed the non-layer weights ("output", a ModelWeights without layers) and then each layer
    ("blk.N") as soon as it is built, and returns what to keep (e.g. a copy in a memory pool),
    so at most one part exists twice at a time. `build_on_host` builds every part in host
    memory, for `adopt` to copy where it belongs: the device then never holds a part twice (a
    device budget's choice: the 8B's non-layer part alone is 693 MiB)."""
    device_load = WeightLoader(gguf, device, dtype, native, staging)
    host_load = WeightLoader(gguf, torch.device("cpu"), dtype, native)
    load = host_load if build_on_host and device.type != "cpu" else device_load
    c = config
    total = c.n_layers + 1
    tied = not load.has("output.weight")
    vocab_dtype = vocab_dtype or dtype
    vocab = (c.vocab_size, c.hidden_size)
    embedding = load.matrix("token_embd.weight", *vocab, vocab_dtype)
    output = embedding if tied else load.matrix("output.weight", *vocab, vocab_dtype)
    rope_freqs = load.vector("rope_freqs.weight") if load.has("rope_freqs.weight") else None
    fixed = ModelWeights(
        embedding=embedding,
        output=output,
        output_norm=load.vector("output_norm.weight"),
        layers=[],
        rope_freqs=rope_freqs,
    )
    fixed = adopt("output", fixed)
    del embedding, output, rope_freqs
    if progress:
        progress(1, total)
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        load = host_load if (on_host(i) or build_on_host) and device.type != "cpu" else device_load

        def bias(kind: str, prefix: str = p) -> str | None:
            return f"{prefix}attn_{kind}.bias" if c.qkv_bias else None

        layer = LayerWeights(
            attn_norm=load.vector(p + "attn_norm.weight"),
            qkv=load.linear(
                [
                    (p + "attn_q.weight", c.q_size, bias("q")),
                    (p + "attn_k.weight", c.kv_size, bias("k")),
                    (p + "attn_v.weight", c.kv_size, bias("v")),
                ],
                c.hidden_size,
            ),
            o=load.linear([(p + "attn_output.weight", c.hidden_size, None)], c.q_size),
            ffn_norm=load.vector(p + "ffn_norm.weight"),
            gate_up=load.linear(
                [
                    (p + "ffn_gate.weight", c.ffn_size, None),
                    (p + "ffn_up.weight", c.ffn_size, None),
                ],
                c.hidden_size,
            ),
            down=load.linear([(p + "ffn_down.weight", c.hidden_size, None)], c.ffn_size),
        )
        if c.qk_norm:
            layer.q_norm = load.vector(p + "attn_q_norm.weight")
            layer.k_norm = load.vector(p + "attn_k_norm.weight")
        if c.sandwich_norms:
            layer.post_attn_norm = load.vector(p + "post_attention_norm.weight")
            layer.post_ffn_norm = load.vector(p + "post_ffw_norm.weight")
        layers.append(adopt(f"blk.{i}", layer))
        if progress:
            progress(i + 2, total)
    fixed.layers = layers
    return fixed
