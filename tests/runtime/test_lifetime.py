"""METALLIC_DEBUG=1's lifetime checks, on CPU: each test plants a violation (or a legal pattern
that looks like one) and sees it caught (or not)."""

import gc

import numpy as np
import pytest
import torch

from metallic.errors import MetallicError
from metallic.runtime.batch import SequenceChunk, StepBatch
from metallic.runtime.graphs import StepGraphs, graph_tensors
from metallic.runtime.lifetime import (
    GraphGuard,
    LifetimeError,
    LifetimeTracker,
    debug_enabled,
    fingerprint,
)
from metallic.runtime.staging import StagingRing

CPU = torch.device("cpu")


@pytest.fixture
def debug(monkeypatch):
    monkeypatch.setenv("METALLIC_DEBUG", "1")


class FakeEvent:
    """A completion that fires when the test says so."""

    def __init__(self) -> None:
        self.fired = False

    def query(self) -> bool:
        return self.fired

    def synchronize(self) -> None:
        self.fired = True


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("YES", True), ("0", 0)])
def test_debug_enabled_reads_the_environment(monkeypatch, value, on):
    monkeypatch.setenv("METALLIC_DEBUG", value)
    assert debug_enabled() is bool(on)
    monkeypatch.delenv("METALLIC_DEBUG")
    assert not debug_enabled()


def test_source_modified_before_synchronize_is_caught(debug):
    ring = StagingRing(CPU)
    src = torch.arange(1000, dtype=torch.int32)
    ring.upload(src, label="blk.0.attn_q")
    src.add_(1)
    with pytest.raises(LifetimeError, match=r"blk\.0\.attn_q source was modified in place") as err:
        ring.synchronize()
    assert isinstance(err.value, MetallicError) and "\n" not in str(err.value)
    ring.synchronize()  # reported once, then forgotten


def test_source_modified_is_caught_at_the_next_upload(debug):
    ring = StagingRing(CPU)
    src = torch.arange(1000, dtype=torch.int32)
    ring.upload(src)
    src[3] = 7
    with pytest.raises(LifetimeError, match="upload 1 source was modified"):
        ring.upload(torch.zeros(4))


def test_source_freed_before_completion_is_caught(debug):
    ring = StagingRing(CPU)
    src = torch.arange(1000, dtype=torch.int32)
    ring.upload(src, label="blk.1.ffn_up")  # the result (an alias on CPU) is dropped too
    del src
    gc.collect()
    with pytest.raises(LifetimeError, match=r"blk\.1\.ffn_up source was freed"):
        ring.synchronize()


def test_source_resized_before_completion_is_caught(debug):
    ring = StagingRing(CPU)
    src = torch.arange(10, dtype=torch.int32)
    ring.upload(src, torch.empty(40, dtype=torch.uint8), label="norm")
    src.resize_(1 << 20)
    with pytest.raises(LifetimeError, match="norm source was resized or moved"):
        ring.synchronize()


def test_untouched_uploads_pass_and_leave_nothing_pending(debug):
    ring = StagingRing(CPU)
    src = torch.arange(1000, dtype=torch.int32)
    out = torch.empty(4000, dtype=torch.uint8)
    assert ring.upload(src, out) is out
    ring.upload(src)
    assert len(ring.tracker.pending) == 1  # the second upload checked the first one's source
    ring.synchronize()
    assert ring.tracker.pending == []
    assert torch.equal(out, src.view(torch.uint8))


def test_loader_patterns_are_not_violations(debug):
    """What the weight loader does: temporary views of memory it does not own (the map) as
    sources, one destination filled slice by slice, then dropped once the kernels' planes are
    copied out of it (ordered after the copy, so legal)."""
    ring = StagingRing(CPU)
    mapped = np.arange(64, dtype=np.uint8)
    out = torch.empty(64, dtype=torch.uint8)
    for first in range(0, 64, 16):
        ring.upload(torch.from_numpy(mapped[first : first + 16]), out[first : first + 16])
    assert torch.equal(out, torch.arange(64, dtype=torch.uint8))
    del out
    gc.collect()
    ring.synchronize()
    assert ring.tracker.pending == []


def test_memory_the_map_owns_is_still_checked_for_changes(debug):
    ring = StagingRing(CPU)
    mapped = np.arange(64, dtype=np.uint8)
    ring.upload(torch.from_numpy(mapped), label="token_embd")
    gc.collect()
    mapped[5] = 0
    with pytest.raises(LifetimeError, match="token_embd source was modified behind"):
        ring.synchronize()


def test_debug_off_checks_and_keeps_nothing(monkeypatch):
    monkeypatch.delenv("METALLIC_DEBUG", raising=False)
    ring = StagingRing(CPU)
    assert ring.tracker is None
    src = torch.arange(1000, dtype=torch.int32)
    ring.upload(src)
    src.add_(1)
    ring.synchronize()  # the same violation goes unchecked
    assert ring.n_uploads == 0


def test_version_counter_misses_data_and_numpy_writes_but_the_fingerprint_does_not():
    for write in (lambda t: t.data.__setitem__(0, 99), lambda t: t.numpy().__setitem__(0, 99)):
        t = torch.zeros(100, dtype=torch.int32)
        tracker = LifetimeTracker()
        tracker.watch("kv", t)
        version = t._version
        write(t)
        assert t._version == version  # torch did not see it ...
        with pytest.raises(LifetimeError, match="kv was modified behind torch's version"):
            tracker.poll()  # ... the fingerprint did


def test_a_view_made_before_registration_shares_the_version_counter():
    t = torch.zeros(100)
    view = t[10:20]
    tracker = LifetimeTracker()
    tracker.watch("x", t)
    view.fill_(1)
    with pytest.raises(LifetimeError, match="x was modified in place"):
        tracker.poll()


def test_fingerprint_samples_large_tensors_and_sees_order():
    big = torch.zeros(1 << 20)
    before = fingerprint(big)
    big[0] = 1  # the sample starts at element 0
    assert fingerprint(big) != before
    small = torch.tensor([1, 2], dtype=torch.int32)
    assert fingerprint(small) != fingerprint(small.flip(0))


def test_work_pending_on_an_event_is_checked_only_once_it_fires():
    tracker = LifetimeTracker()
    done = FakeEvent()
    t = torch.ones(8)
    tracker.watch("pinned", t, done)
    tracker.poll()
    assert len(tracker.pending) == 1
    done.fired = True
    tracker.poll()
    assert tracker.pending == []


def test_freed_while_the_event_is_pending_is_caught():
    tracker = LifetimeTracker()
    done = FakeEvent()
    t = torch.ones(8)
    tracker.watch("early", t, done)
    del t
    gc.collect()
    done.fired = True
    with pytest.raises(LifetimeError, match="early was freed"):
        tracker.poll()
    assert tracker.pending == []


def test_freed_after_the_event_fired_is_not_a_violation():
    tracker = LifetimeTracker()
    done = FakeEvent()
    t = torch.ones(8)
    tracker.watch("late", t, done)
    done.fired = True  # completed, but nobody has polled yet
    del t
    gc.collect()
    tracker.poll()
    assert tracker.pending == []


def test_writes_to_a_sibling_view_of_the_same_base_are_not_violations():
    """Views share their base's version counter: a bump alone does not convict a view."""
    base = torch.zeros(2 << 20)  # sampled fingerprint: a large tensor
    tracker = LifetimeTracker()
    first, second = base[: 1 << 20], base[1 << 20 :]
    tracker.watch("first half", first, FakeEvent())
    version = first._version
    second.fill_(1)
    assert first._version != version
    tracker.synchronize()
    tracker.watch("first half", first, FakeEvent())
    first[256] = 2  # a sampled element: the bump is confirmed by the fingerprint
    with pytest.raises(LifetimeError, match="first half was modified in place"):
        tracker.synchronize()


def test_graph_guard_passes_unchanged_tensors():
    a, b = torch.zeros(4), torch.zeros(2, 3)
    guard = GraphGuard([("a", a), ("b", b)])
    a.add_(1)  # a replay rewrites the contents; only the addresses matter
    guard.check()


@pytest.mark.parametrize(
    "plant",
    [
        lambda t: t.set_(torch.empty(4)),
        lambda t: t.resize_(1 << 20),
        lambda t: t.untyped_storage().resize_(1 << 20),
    ],
)
def test_graph_guard_catches_replaced_or_resized_storage(plant):
    t = torch.zeros(4)
    guard = GraphGuard([("graph 4x1 input tokens", t)])
    plant(t)
    with pytest.raises(LifetimeError, match="graph 4x1 input tokens was resized or moved"):
        guard.check()


def test_graph_guard_catches_a_freed_tensor():
    t = torch.zeros(4)
    guard = GraphGuard([("graph 1x1 output", t)])
    del t
    gc.collect()
    with pytest.raises(LifetimeError, match="graph 1x1 output was freed since its graph"):
        guard.check()


def test_step_graphs_guard_their_static_batch_only_in_debug_mode(monkeypatch):
    monkeypatch.delenv("METALLIC_DEBUG", raising=False)
    assert StepGraphs(lambda batch: batch.tokens).guards is None
    monkeypatch.setenv("METALLIC_DEBUG", "1")
    assert StepGraphs(lambda batch: batch.tokens).guards == {}
    batch = StepBatch.build([SequenceChunk(0, [5, 6], [[1]])], CPU, table_width=2)
    static = batch.static_copy()
    out = torch.zeros(2, 8)
    tensors = graph_tensors((2, 1), static, out)
    assert [label for label, _ in tensors][-2:] == [
        "graph 2x1 input block_tables[0]",
        "graph 2x1 output",
    ]
    guard = GraphGuard(tensors)
    static.load(batch)
    guard.check()
    static.packed.set_(torch.empty_like(static.packed))
    with pytest.raises(LifetimeError, match="graph 2x1 input packed was resized or moved"):
        guard.check()
