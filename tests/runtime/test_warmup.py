"""The start-up thread: nothing on the CPU; where kernels compile, Triton's cache key is ready
(memoized) once the thread is joined."""

from __future__ import annotations

import pytest
import torch

from metallic.runtime import warmup

triton = pytest.importorskip("triton")
triton_cache = pytest.importorskip("triton.runtime.cache")


def test_nothing_starts_where_nothing_compiles(monkeypatch: pytest.MonkeyPatch):
    assert warmup.start_gpu_warmup(torch.device("cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert warmup.start_gpu_warmup(torch.device("cuda")) is None


def test_the_thread_leaves_tritons_key_computed(monkeypatch: pytest.MonkeyPatch):
    # The CPU stands in for the GPU: its "context" is a CPU allocation; the hash is the real one.
    monkeypatch.setattr(warmup, "compiles_kernels", lambda device: True)
    triton_cache.triton_key.cache_clear()
    thread = warmup.start_gpu_warmup(torch.device("cpu"))
    assert thread is not None
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert triton_cache.triton_key.cache_info().currsize == 1
    assert triton_cache.triton_key().startswith(triton.__version__)
