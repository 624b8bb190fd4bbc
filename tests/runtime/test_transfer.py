"""Per-step transfers through the pinned ring (CPU: plain copies; CUDA is measured on the GPU)."""

import numpy as np
import torch

from metallic.runtime.transfer import PinnedRing


def test_uploads_and_downloads_keep_values_and_types() -> None:
    ring = PinnedRing(torch.device("cpu"), slots=2)
    assert ring.upload([]).dtype == torch.int64  # an empty list of indices indexes
    for values in ([3, 1, 2], np.arange(5, dtype=np.int32), torch.tensor([True, False])):
        got = ring.upload(values)
        expected = torch.as_tensor(np.asarray(values))
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    source = torch.arange(4.0)
    host, ready = ring.download(source)
    source += 1  # the host copy is its own
    assert ready is None and torch.equal(host, torch.arange(4.0))
