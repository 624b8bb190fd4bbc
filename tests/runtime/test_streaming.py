"""Layers packed into one buffer and streamed through two slots, checked on CPU tensors."""

from __future__ import annotations

import torch

from metallic.runtime.streaming import LayerStreamer, pack, pack_layout


def test_pack_keeps_values_and_merges_shared_bytes() -> None:
    raw = torch.arange(96, dtype=torch.uint8)
    words, halves = raw[16:80].view(torch.int32), raw[16:80].view(torch.float16)  # one span
    norm = torch.randn(7)
    tensors = [words, halves, norm, torch.randn(3, 5)]
    layout, copies, size = pack_layout(tensors)
    assert len(copies) == 3  # the two views of `raw` share one copy
    assert layout[0].offset == layout[1].offset
    packed = pack(tensors, torch.device("cpu"))
    assert packed.nbytes == size < 64 + 3 * 256
    for original, view in zip(tensors, packed.tensors(), strict=True):
        assert view.dtype == original.dtype and torch.equal(view, original)
    packed.tensors()[0].zero_()
    assert torch.count_nonzero(packed.tensors()[1]) == 0  # still one set of bytes


def test_streamer_serves_each_layer_in_its_slot() -> None:
    layers = {i: [torch.full((10 + i,), float(i)), torch.randn(4, 4)] for i in (1, 2, 4, 5)}
    host = {i: pack(ts, torch.device("cpu")) for i, ts in layers.items()}
    streamer = LayerStreamer(torch.device("cpu"), host)
    assert len(streamer.slots) == 2 and streamer.device_bytes == 2 * host[5].nbytes
    views = {i: streamer.device_views(i) for i in layers}
    for _ in range(2):  # two steps: the slots are refilled from the start
        streamer.begin_step()
        for i in range(6):
            streamer.before_layer(i)
            if i in layers:
                for view, original in zip(views[i], layers[i], strict=True):
                    assert torch.equal(view, original)
            if i:
                streamer.after_layer(i - 1)
