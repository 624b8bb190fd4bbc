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
    storage merge."""
    spans: dict[int, list[list[int]]] = {}  # storage -> merged [first, end, owner index]
    for index, t in enumerate(tensors):
        storage, first, end = _byte_span(t)
        merged = spans.setdefault(storage, [])
        merged.append([first, end, index])
    placed: dict[tuple[int, int], int] = {}  # (storage, span first) -> buffer offset
    copies: list[tuple[int, int, int, int]] = []
    cursor = 0
    span_of: dict[int, tuple[int, int]] = {}
    for storage, ranges in spans.items():
        ranges.sort()
        groups: list[list[int]] = []
        for first, end, index in ranges:
            if groups and first < groups[-1][1]:
                groups[-1][1] = max(groups[-1][1], end)
            else:
                groups.append([first, end, index])
            span_of[index] = (storage, groups[-1][0])
        for first, end, index in groups:
            # Same residue mod 16 as the source: every dtype's alignment survives the move.
            cursor = -(-cursor // ALIGN) * ALIGN + first % 16
            placed[(storage, first)] = cursor
            copies.append((index, first, end, cursor))
            cursor += end - first
    views = []
    for index, t in enumerate(tensors):
        storage, span_first = span_of[index]
        start = placed[(storage, span_first)] + _byte_span(t)[1] - span_first
        views.append(_View(start, t.dtype, tuple(t.shape)))
    return views, copies, cursor


def _as_view(buffer: torch.Tensor, view: _View) -> torch.Tensor:
    n_bytes = view.dtype.itemsize
    for size in view.shape:
        n_bytes *= size
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
        self.order = sorted(host_layers)
        self.rank = {layer: k for k, layer in enumerate(self.order)}
        self.host = dict(host_layers)
        slot_bytes = max((b.nbytes for b in self.host.values()), default=0)
        n_slots = min(2, len(self.order))
        allocate = allocate or (lambda n, _: torch.empty(n, dtype=torch.uint8, device=device))
        self.slots = [allocate(slot_bytes, f"stream slot {k}") for k in range(n_slots)]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: dict[int, torch.cuda.Event] = {}
        self.bytes_streamed = 0

    @property
    def layers(self) -> list[int]:
        return self.order

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
        for k in range(min(len(self.slots), len(self.order))):
            self._copy(k)

    def before_layer(self, layer: int) -> None:
        """Compute on `layer` waits for its copy (a host layer) or for nothing (a device one)."""
        if layer in self.rank and self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied.pop(layer))

    def after_layer(self, layer: int) -> None:
        """`layer` is done with its slot: fill the slot with the host layer two ahead."""
        k = self.rank.get(layer)
        if k is None or k + len(self.slots) >= len(self.order):
            return
        if self.stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(done)
        self._copy(k + len(self.slots))

    def _copy(self, k: int) -> None:
        layer = self.order[k]
        source = self.host[layer].buffer
        target = self.slots[k % len(self.slots)][: source.numel()]
        self.bytes_streamed += source.numel()
        if self.stream is None:
            target.copy_(source)
            return
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[layer] = event
