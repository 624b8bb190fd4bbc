"""Debug checks that memory handed to asynchronous work outlives it, unchanged.

A copy on a side stream, or a replayed CUDA graph, uses addresses fixed when the work was
enqueued or captured. If the tensor behind one is freed, reallocated or rewritten by the host
before the work completes, nothing fails there: the copy moves other bytes, the graph writes into
memory that now belongs to someone else, and the symptom shows up far away. With METALLIC_DEBUG=1
the staging ring and the step graphs record what they hand off and verify, once the work has
completed (or before a replay), that it is still there and unchanged; a violation raises
`LifetimeError` naming it. Off (the default), nothing here runs and nothing is recorded.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from typing import Protocol

import torch

from metallic.errors import MetallicError

FULL_CHECKSUM = 1 << 16  # tensors of up to this many elements are checksummed whole
SAMPLES = 4096  # larger ones: about this many evenly strided elements


def debug_enabled() -> bool:
    """METALLIC_DEBUG is 1, true or yes. Callers read it once, when they are built."""
    return os.environ.get("METALLIC_DEBUG", "").strip().lower() in ("1", "true", "yes")


class LifetimeError(MetallicError):
    """A tensor handed to asynchronous work was freed, moved or modified before it completed."""

    def __init__(self, label: str, problem: str) -> None:
        super().__init__(f"lifetime check: {label} {problem}")
        self.label = label
        self.problem = problem


class Completion(Protocol):
    """What marks the work done: a `torch.cuda.Event`, or anything with the same two methods."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of the bytes of `t` (all, or a strided sample) as a 0-dim int64
    tensor on its device: it catches writes torch's version counter misses (through `.data`,
    numpy, another tensor over the same memory) without waiting for the device."""
    flat = t.detach().reshape(-1)
    if flat.numel() > FULL_CHECKSUM:
        flat = flat[:: -(-flat.numel() // SAMPLES)]
    data = flat.contiguous().view(torch.uint8).to(torch.int64)
    return (data * torch.arange(1, data.numel() + 1, device=data.device)).sum()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class _Snapshot:
    """One tensor as it was handed off: its memory (weakly), where it lives, and optionally its
    version and contents. `done` is the work's completion; None: it completes when checked."""

    def __init__(
        self, label: str, t: torch.Tensor, done: Completion | None = None, contents: bool = True
    ) -> None:
        self.label = label
        self.done = done
        self.freed = False  # the memory went while the work was still pending
        self.tensor = weakref.ref(t)
        storage = t.untyped_storage()
        # Memory torch does not own (a numpy array, the memory map) is freed by its owner, not
        # when the tensor goes: hold the view and check only that the bytes stay the same.
        self.held = storage if contents and not storage.resizable() else None
        self.storage = weakref.ref(storage, self._on_free)
        self.where = (storage.data_ptr(), storage.nbytes())
        self.geometry = (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        self.contents = contents
        self.version = _version(t) if contents else None
        self.view = t._base is not None  # its version counter is shared with the whole base
        self.fingerprint = fingerprint(t) if contents else None

    def _on_free(self, _: object) -> None:
        self.freed = self.done is None or not self.done.query()

    def problem(self) -> str | None:
        """What happened to the tensor since the snapshot, or None."""
        t = self.tensor()
        if t is not None:
            geometry = (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if geometry != self.geometry:
                return "was resized or moved (its storage was replaced or reallocated)"
        storage = self.held if self.held is not None else self.storage()
        if storage is None:
            return "was freed" if self.freed else None
        if t is None and (storage.data_ptr(), storage.nbytes()) != self.where:
            return "was resized or moved (its storage was reallocated)"
        if not self.contents:
            return None
        rebuilt = t is None
        if t is None:  # a view that was dropped, over memory that lives on: rebuild it
            _, offset, shape, stride, dtype = self.geometry
            t = torch.empty(0, dtype=dtype, device=storage.device).set_(
                storage, offset, shape, stride
            )
        version = self.version if rebuilt else _version(t)
        if version != self.version and not self.view:
            return f"was modified in place (version {self.version} -> {version})"
        if int(fingerprint(t)) != int(self.fingerprint):  # type: ignore[arg-type]
            if version != self.version:
                return f"was modified in place (version {self.version} -> {version})"
            return "was modified behind torch's version counter (e.g. through .data or numpy)"
        return None


class LifetimeTracker:
    """Tensors handed to asynchronous work, each checked once its work has completed."""

    def __init__(self) -> None:
        self.pending: list[_Snapshot] = []

    def watch(self, label: str, t: torch.Tensor, done: Completion | None = None) -> None:
        """`t` (contents final now) must stay alive and unchanged until `done` has fired; with
        no `done`, until the next `poll` or `synchronize`."""
        self.pending.append(_Snapshot(label, t, done))

    def poll(self) -> None:
        """Check, and forget, every tensor whose work has completed; never waits."""
        self._check([s for s in self.pending if s.done is None or s.done.query()])

    def synchronize(self) -> None:
        """Wait for all the work and check every tensor."""
        for s in self.pending:
            if s.done is not None:
                s.done.synchronize()
        self._check(list(self.pending))

    def _check(self, ready: list[_Snapshot]) -> None:
        checked = {id(s) for s in ready}
        self.pending = [s for s in self.pending if id(s) not in checked]
        for s in ready:
            problem = s.problem()
            if problem is not None:
                raise LifetimeError(s.label, f"{problem} before its asynchronous work completed")


class GraphGuard:
    """The tensors a captured graph uses by address: `check()` before each replay that each is
    alive at the address and in the shape it had at capture."""

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.snapshots = [_Snapshot(label, t, contents=False) for label, t in tensors]

    def check(self) -> None:
        for s in self.snapshots:
            problem = s.problem()
            if problem is not None:
                raise LifetimeError(s.label, f"{problem} since its graph was captured")
