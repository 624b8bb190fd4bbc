"""Model steps captured as CUDA graphs and replayed: the seed's command-buffer reuse.

A step launches a few hundred small kernels; replaying them as one graph removes the CPU's launch
cost (tens of microseconds each through Triton's launcher), which dominates small models. One
graph per step shape (tokens, sequences): decode steps of each batch size and key-count bound
(a power of two: a short context splits its attention over few programs), and prompt chunks
padded to a few bucket sizes. Its input is a static `StepBatch` refreshed by one device copy,
its output a static logits tensor that the caller reads before the next replay.

With METALLIC_DEBUG=1 every replay is preceded by a check (lifetime.py) that the static batch's
tensors and the output are alive at the addresses the graph captured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from metallic.runtime.batch import StepBatch
from metallic.runtime.lifetime import GraphGuard, debug_enabled

Step = Callable[[StepBatch], torch.Tensor]
GraphKey = tuple[int, int, int]  # tokens, sequences, key-count bound (decode only)

log = logging.getLogger("metallic")


class StepGraphs:
    def __init__(self, step: Step, release_cache: bool = False) -> None:
        """`step(batch)` must run without host synchronization and read every per-step value
        from `batch` (graphs replay fixed addresses). `release_cache`: before each capture,
        hand torch's cached blocks back to the device (under a device budget: the capture
        allocates from the graphs' own pool, and while it runs the allocator cannot free the
        cache to stay under its cap)."""
        self.step = step
        self.release_cache = release_cache
        self.side: torch.cuda.Stream | None = None  # the warm-up stream, one for every capture
        self.graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, StepBatch, torch.Tensor]]
        self.graphs = {}
        self.pool: tuple[int, int] | None = None  # one memory pool shared by every graph
        self.guards: dict[GraphKey, GraphGuard] | None = {} if debug_enabled() else None

    def inputs(self, key: GraphKey) -> StepBatch | None:
        """The static input of the graph of shape `key` once captured: a step of that shape
        built in it (same layout) replays without copying its metadata there."""
        captured = self.graphs.get(key)
        return None if captured is None else captured[1]

    def run(self, batch: StepBatch) -> torch.Tensor:
        """The step's output for `batch` (valid until the next call)."""
        key = (batch.n_tokens, len(batch.chunks), batch.max_keys if batch.decode else 0)
        if key not in self.graphs:
            began = time.perf_counter()
            self.graphs[key] = self._capture(batch)
            log.info(
                "captured a CUDA graph for %d tokens of %d sequences%s in %.2f s",
                key[0],
                key[1],
                f" (keys <= {key[2]})" if key[2] else "",
                time.perf_counter() - began,
            )
            if self.guards is not None:
                self.guards[key] = GraphGuard(graph_tensors(key, *self.graphs[key][1:]))
        graph, static, out = self.graphs[key]
        if self.guards is not None:
            self.guards[key].check()
        static.load(batch)
        graph.replay()
        return out

    def _capture(self, batch: StepBatch) -> tuple[torch.cuda.CUDAGraph, StepBatch, torch.Tensor]:
        static = batch.static_copy()
        # Warm-up runs compile the kernels and settle the allocator outside the capture; they
        # compute this very step (same tokens, same cache writes), so they change nothing.
        # One stream for every warm-up: torch caches blocks per stream (and cuBLAS keeps a
        # workspace per stream), so a new stream each time would keep more memory each time.
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for _ in range(2):
                self.step(static)
        torch.cuda.current_stream().wait_stream(self.side)
        if self.release_cache:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(static)
        self.pool = graph.pool()
        return graph, static, out


def graph_tensors(
    key: GraphKey, static: StepBatch, out: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """The tensors a graph of shape `key` uses by address, named for errors."""
    name = f"graph {key[0]}x{key[1]}"
    fields = ["packed", "tokens", "positions", "seq_lens", "cu_seqlens_q", "last_rows"]
    tensors = [(f"{name} input {field}", getattr(static, field)) for field in fields]
    tensors += [(f"{name} input block_tables[{i}]", t) for i, t in enumerate(static.block_tables)]
    return [*tensors, (f"{name} output", out)]
