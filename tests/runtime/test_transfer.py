"""Per-step transfers through the pinned ring (CPU: plain copies; CUDA is measured on the GPU)."""

import numpy as np
import pytest
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


def test_an_upload_into_a_given_tensor_fills_it_and_checks_its_size() -> None:
    ring = PinnedRing(torch.device("cpu"), slots=2)
    out = torch.zeros(2, 3, dtype=torch.int32)
    assert ring.upload(np.arange(6, dtype=np.int32), out=out) is out
    assert out.flatten().tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="upload"):
        ring.upload(np.arange(5, dtype=np.int32), out=out)
