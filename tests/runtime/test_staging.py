"""The staging ring's contract where it can run here (no CUDA: a plain copy)."""

import torch

from metallic.runtime.staging import StagingRing


def test_upload_returns_the_bytes_and_fills_out():
    ring = StagingRing(torch.device("cpu"))
    src = torch.arange(1000, dtype=torch.int32)
    got = ring.upload(src)
    assert torch.equal(got, src.view(torch.uint8))
    out = torch.zeros(4000, dtype=torch.uint8)
    assert ring.upload(src, out) is out
    assert torch.equal(out, src.view(torch.uint8))
    assert ring.stats()["buffers"] == 0  # no pinned memory without CUDA
