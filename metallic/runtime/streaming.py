"""Layers kept on the host and streamed to the device one layer ahead of compute.

Each host layer's tensors live in one host buffer (pinned on CUDA, so copies are asynchronous and
can be captured in a CUDA graph). The device holds two slot buffers the size of the largest host
layer: the k-th host layer of a step computes from slot k % 2 while the copy engine fills the
other slot with layer k + 1. A layer's device tensors are permanent views into its slot, so the
model reads streamed and resident layers alike; only `before_layer`/`after_layer` order the
copies against compute, through events (the compute stream never waits on the whole device).

Tensors that share bytes (a Q4_K matrix seen as int32 words and as f16) are packed once: spans of
one storage that overlap are merged, and every view keeps its offset inside its span.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ALIGN = 256  # span starts in a layer buffer; keeps every view as aligned as in its source


@dataclass(frozen=True)
class _View:
    """Where one tensor sits in its layer buffer."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _byte_span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of a contiguous tensor inside its storage."""
    if not t.is_contiguous():
        raise ValueError("only contiguous tensors can be streamed")
    first = t.storage_offset() * t.element_size()
    return t.untyped_storage().data_ptr(), first, first + t.numel() * t.element_size()


def pack_layout(
    tensors: list[torch.Tensor],
) -> tuple[list[_View], list[tuple[int, int, int, int]], int]:
    """Views of `tensors` in one buffer, the spans to copy (index of a tensor in the span's
    storage, first byte, end byte, buffer offset) and the buffer size. Overlapping spans of one
    storage merge into one copy."""
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    for index, t in enumerate(tensors):
        storage, first, end = _byte_span(t)
        by_storage.setdefault(storage, []).append((first, end, index))
    views: dict[int, _View] = {}
    spans: list[list[int]] = []  # [tensor index, first byte, end byte, buffer offset]
    size = 0
    for ranges in by_storage.values():
        span: list[int] | None = None
        for first, end, index in sorted(ranges):
            if span is None or first >= span[2]:
                # Same residue mod 16 as the source: every dtype's alignment survives the move.
                span = [index, first, end, -(-size // ALIGN) * ALIGN + first % 16]
                spans.append(span)
            span[2] = max(span[2], end)
            size = span[3] + span[2] - span[1]
            t = tensors[index]
            views[index] = _View(span[3] + first - span[1], t.dtype, tuple(t.shape))
    copies = [(i, first, end, at) for i, first, end, at in spans]
    return [views[i] for i in range(len(tensors))], copies, size


def _as_view(buffer: torch.Tensor, view: _View) -> torch.Tensor:
    n_bytes = math.prod(view.shape) * view.dtype.itemsize
    return buffer[view.offset : view.offset + n_bytes].view(view.dtype).view(view.shape)


@dataclass
class PackedLayer:
    """A layer's tensors packed into one byte buffer (on the host or the device)."""

    buffer: torch.Tensor
    layout: list[_View]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def tensors(self) -> list[torch.Tensor]:
        return [_as_view(self.buffer, view) for view in self.layout]


def packed_size(tensors: list[torch.Tensor]) -> int:
    return pack_layout(tensors)[2]


def pack(
    tensors: list[torch.Tensor],
    device: torch.device,
    pin: bool = False,
    out: torch.Tensor | None = None,
) -> PackedLayer:
    """`tensors` copied into one buffer on `device`: `out` (uint8, `packed_size` bytes, e.g. a
    memory-pool block) or a new one (pinned host memory when `pin`)."""
    layout, copies, size = pack_layout(tensors)
    buffer = (
        out
        if out is not None
        else torch.empty(size, dtype=torch.uint8, device=device, pin_memory=pin)
    )
    for index, first, end, offset in copies:
        source = tensors[index]
        span = torch.empty(0, dtype=torch.uint8, device=source.device)
        span.set_(source.untyped_storage(), first, (end - first,))
        buffer[offset : offset + end - first].copy_(span)
    return PackedLayer(buffer, layout)


class LayerStreamer:
    """Host layers (index -> tensors) served from two device slots, one layer ahead."""

    def __init__(
        self,
        device: torch.device,
        host_layers: dict[int, PackedLayer],
        allocate: Callable[[int, str], torch.Tensor] | None = None,
    ) -> None:
        """`host_layers`: packed with `pack(..., pin=True)` on CUDA (async, capturable copies);
        `allocate(n_bytes, name)` provides the slots (default: plain device tensors)."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.layers = sorted(host_layers)
        self.rank = {layer: k for k, layer in enumerate(self.layers)}
        self.host = dict(host_layers)
        slot_bytes = max((b.nbytes for b in self.host.values()), default=0)
        n_slots = min(2, len(self.layers))
        allocate = allocate or (lambda n, _: torch.empty(n, dtype=torch.uint8, device=device))
        self.slots = [allocate(slot_bytes, f"stream slot {k}") for k in range(n_slots)]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: dict[int, torch.cuda.Event] = {}

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    @property
    def host_bytes(self) -> int:
        return sum(b.nbytes for b in self.host.values())

    def device_views(self, layer: int) -> list[torch.Tensor]:
        """The layer's tensors as the model sees them: views into its slot."""
        slot = self.slots[self.rank[layer] % len(self.slots)]
        return [_as_view(slot, view) for view in self.host[layer].layout]

    def begin_step(self) -> None:
        """Start copying the first two host layers (slots are free: the previous step's work on
        them precedes this one on the compute stream)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for k in range(len(self.slots)):
            self._copy(k)

    def before_layer(self, layer: int) -> None:
        """Compute on `layer` waits for its copy (a host layer) or for nothing (a device one)."""
        if layer in self.rank and self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied.pop(layer))

    def after_layer(self, layer: int) -> None:
        """`layer` is done with its slot: fill the slot with the host layer two ahead."""
        k = self.rank.get(layer)
        if k is None or k + len(self.slots) >= len(self.layers):
            return
        if self.stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(done)
        self._copy(k + len(self.slots))

    def _copy(self, k: int) -> None:
        layer = self.layers[k]
        source = self.host[layer].buffer
        target = self.slots[k % len(self.slots)][: source.numel()]
        if self.stream is None:
            target.copy_(source)
            return
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[layer] = event
