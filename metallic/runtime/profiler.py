"""Time per op and per layer of model steps, and the ranges a trace viewer shows.

The transformer calls its hooks object as a step runs: `begin(batch)`, `mark(kind, layer)` as
each op starts, `end(logits)` when the step's output is ready. By default that object is `OFF`,
whose methods do nothing, so a captured CUDA graph holds no trace of them and an eager step pays
a dozen empty calls per layer. A `Profiler` in its place stamps every mark: the marks cut the
forward into consecutive ops, so op times add up to the forward's time by construction, and the
time from one forward's end to the next one's start ("between": sampling, scheduling, the
host's work) is kept too.

Stamps come from the host clock on the CPU and from timing events on the CUDA stream. Recorded
while a decode step is captured as a graph, the events become nodes of the graph (`external`
events), so each replay times the step as it really runs, without the launch gaps an eager step
has (an 8B decode step: ~4 ms replayed, ~25 ms eager). A graph's events are read back after
each replay (`replayed`, called by the model runner), which waits for the step: while profiling,
the host does not run ahead of the device, and "between" includes that wait's reading.

Each event costs device time, which the ops' times include (the device drains its work to stamp
one): an 8B decode step replayed with an event at every op ran 22% longer than without. So on
CUDA ops can be timed in groups (`fold`): a folded kind's mark stamps nothing and its time joins
the op before it in the same layer, under a joined name ("gate_up+activation"). `GPU_FOLDED`
keeps each product and attention apart with the small ops beside them: 5 events a layer, not 9.

With `ranges`, every step, layer and op is also a `record_function` range (what torch.profiler's
Chrome/Perfetto trace shows) and, on CUDA, an NVTX range (what Nsight Systems shows).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from metallic.runtime.batch import StepBatch

OpKey = tuple[str, int]  # (op kind, layer); layer -1 for the ops outside the layers
JOIN = "+"  # between the kinds of a group of ops timed together
# Timed with the op before them on CUDA: a layer's groups are attn_norm+qkv+rope, attention,
# attn_out+ffn_norm, gate_up+activation and down.
GPU_FOLDED = frozenset({"qkv", "rope", "ffn_norm", "activation"})


class Hooks:
    """What a model step calls around its ops. This base does nothing: profiling is off."""

    def begin(self, batch: StepBatch, every_row: bool) -> None:
        """A forward of `batch` starts (`every_row`: logits for every token, not only the
        last of each sequence)."""

    def mark(self, kind: str, layer: int = -1) -> None:
        """Op `kind` of `layer` starts; the op before it ends."""

    def end(self, logits: torch.Tensor) -> None:
        """The forward's output is computed."""

    def replayed(self, logits: torch.Tensor, batch: StepBatch) -> None:
        """A captured graph whose output is `logits` was replayed for `batch`."""


OFF = Hooks()


@dataclass(frozen=True)
class StepShape:
    """What a forward computed, enough to count its bytes and FLOPs: each sequence's chunk as
    (first position, tokens), and how many rows of logits it made."""

    chunks: tuple[tuple[int, int], ...]
    logit_rows: int

    @classmethod
    def of(cls, batch: StepBatch, every_row: bool) -> StepShape:
        chunks = tuple((c.start, len(c.tokens)) for c in batch.chunks)
        return cls(chunks, batch.n_tokens if every_row else len(chunks))

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def phase(self) -> str:
        """ "decode" when every sequence computes one token, else "prefill"."""
        return "decode" if all(n == 1 for _, n in self.chunks) else "prefill"


@dataclass
class PhaseTimes:
    """Seconds summed over the forwards of one phase."""

    steps: int = 0
    forward: float = 0.0  # first mark to end
    stamps: int = 0  # host clock readings or events, over all the forwards
    between: float = 0.0  # previous forward's end to this one's first mark
    between_steps: int = 0  # forwards that had a previous one to measure from
    ops: dict[OpKey, float] = field(default_factory=dict)
    shapes: Counter[StepShape] = field(default_factory=Counter)


@dataclass
class _Trace:
    shape: StepShape
    labels: list[OpKey] = field(default_factory=list)
    stamps: list[Any] = field(default_factory=list)  # float seconds, or CUDA events


class Profiler(Hooks):
    def __init__(
        self,
        device: torch.device | str,
        *,
        ranges: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        fold: frozenset[str] = frozenset(),
    ) -> None:
        """`ranges`: also open trace ranges (record_function, and NVTX on CUDA); `clock`: the
        host clock that stamps CPU steps; `fold`: op kinds timed with the op before them."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ranges = ranges
        self.clock = clock
        self.fold = fold
        self.phases: dict[str, PhaseTimes] = {}
        self._graph_traces: dict[int, _Trace] = {}  # by the data_ptr of the graph's output
        self._trace: _Trace | None = None
        self._scopes: dict[str, Any] = {}  # the open trace ranges: "step", "layer", "op"
        self._layer = -1  # the layer whose range is open
        self._last_end: float | None = None
        self._anchor: torch.cuda.Event | None = None
        self.reset()

    @staticmethod
    def times_graphs() -> bool:
        """Whether this torch can record timing events inside a captured CUDA graph."""
        try:
            torch.cuda.Event(enable_timing=True, external=True)
        except TypeError:
            return False
        return True

    def reset(self) -> None:
        """Forget what was measured (a warm-up, another workload); graphs captured with events
        keep them and are timed again on their next replay."""
        self.phases = {}
        self._last_end = None
        if self.cuda:
            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record()

    # The hooks.

    def begin(self, batch: StepBatch, every_row: bool) -> None:
        shape = StepShape.of(batch, every_row)
        self._trace = _Trace(shape)
        if self.ranges:
            seqs = len(shape.chunks)
            self._open("step", f"{shape.phase} step: {shape.tokens} tokens of {seqs} sequences")

    def mark(self, kind: str, layer: int = -1) -> None:
        trace = self._trace
        assert trace is not None, "mark() outside begin() .. end()"
        if kind in self.fold and trace.labels and trace.labels[-1][1] == layer:
            trace.labels[-1] = (trace.labels[-1][0] + JOIN + kind, layer)
        else:
            trace.labels.append((kind, layer))
            trace.stamps.append(self._stamp())
        if self.ranges:
            self._close("op")
            if layer != self._layer:
                self._close("layer")
                if layer >= 0:
                    self._open("layer", f"layer {layer}")
                self._layer = layer
            self._open("op", kind)

    def end(self, logits: torch.Tensor) -> None:
        trace, self._trace = self._trace, None
        assert trace is not None, "end() without begin()"
        trace.stamps.append(self._stamp())
        if self.ranges:
            for level in ("op", "layer", "step"):
                self._close(level)
            self._layer = -1
        if self.cuda and torch.cuda.is_current_stream_capturing():
            self._graph_traces[logits.data_ptr()] = trace  # timed at each replay
        elif not self.cuda or torch.cuda.current_stream() == torch.cuda.default_stream():
            self._add(trace.labels, trace.stamps, trace.shape)
        # Else a forward on a side stream: the graph warm-up before a capture, not a step.

    def replayed(self, logits: torch.Tensor, batch: StepBatch) -> None:
        trace = self._graph_traces.get(logits.data_ptr())
        if trace is not None:
            self._add(trace.labels, trace.stamps, StepShape.of(batch, every_row=False))

    # Internals.

    def _stamp(self) -> Any:
        if not self.cuda:
            return self.clock()
        capturing = torch.cuda.is_current_stream_capturing()
        event = torch.cuda.Event(enable_timing=True, external=capturing)
        event.record()
        return event

    def _seconds(self, stamps: list[Any]) -> list[float]:
        if not self.cuda:
            return stamps
        assert self._anchor is not None
        stamps[-1].synchronize()
        return [self._anchor.elapsed_time(e) * 1e-3 for e in stamps]

    def _add(self, labels: list[OpKey], stamps: list[Any], shape: StepShape) -> None:
        times = self._seconds(stamps)
        phase = self.phases.setdefault(shape.phase, PhaseTimes())
        phase.steps += 1
        phase.forward += times[-1] - times[0]
        phase.stamps += len(times)
        phase.shapes[shape] += 1
        if self._last_end is not None:
            phase.between += times[0] - self._last_end
            phase.between_steps += 1
        self._last_end = times[-1]
        ops = phase.ops
        for label, start, stop in zip(labels, times, times[1:], strict=False):
            ops[label] = ops.get(label, 0.0) + stop - start

    def _open(self, level: str, name: str) -> None:
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
        scope = torch.profiler.record_function(name)
        scope.__enter__()
        self._scopes[level] = scope

    def _close(self, level: str) -> None:
        scope = self._scopes.pop(level, None)
        if scope is None:
            return
        scope.__exit__(None, None, None)
        if self.cuda:
            torch.cuda.nvtx.range_pop()
