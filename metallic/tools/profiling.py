"""Profile an engine's steps: time per op kind and per layer, against the device's limits.

`ProfileSession(engine)` puts a `Profiler` into the engine's model (and takes it out at `stop`);
with `trace=FILE` it also records a torch.profiler trace of the same steps, written as a
Chrome/Perfetto JSON file, with a range per step, layer and op (NVTX ranges too on CUDA, for
Nsight Systems). A trace needs eager steps (a replayed graph opens no ranges), so tracing turns
the CUDA graphs off, and GPU op times then include the host's launch gaps. On CUDA the small ops
are timed with the product or attention beside them (runtime/profiler.py: `GPU_FOLDED`), since
every event adds device time; `every_op=True` times each op alone.

`phase_report` turns one phase's times (prefill or decode) into rows per op kind and per layer;
with the roofline's costs and a calibrated device (`metallic doctor --calibrate`), each op also
gets its achieved GB/s and TFLOP/s and the fraction of the device's limit it reached.
`format_report` prints them as markdown tables.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from metallic.engine.engine import Engine
from metallic.models.roofline import Cost, Limits, Roofline
from metallic.runtime import calibration
from metallic.runtime.profiler import GPU_FOLDED, JOIN, OFF, PhaseTimes, Profiler

BETWEEN = "between forwards"  # the row of time outside the model's forward
HOST_CLOCK, CUDA_EVENTS = "host clock", "cuda events"  # what times ops and bench tests


class ProfileSession:
    def __init__(
        self, engine: Engine, *, trace: Path | None = None, every_op: bool = False
    ) -> None:
        self.engine = engine
        self.trace = trace
        cuda = engine.device.type == "cuda"
        fold = GPU_FOLDED if cuda and not every_op else frozenset()
        self.profiler = Profiler(engine.device, ranges=trace is not None, fold=fold)
        self._graphs = engine.runner.cuda_graphs
        if trace is not None or (engine.device.type == "cuda" and not Profiler.times_graphs()):
            engine.runner.cuda_graphs = False
        engine.model.profiler = self.profiler
        self._torch_profiler: torch.profiler.profile | None = None
        if trace is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if engine.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_profiler = torch.profiler.profile(activities=activities)
            self._torch_profiler.start()

    def reset(self) -> None:
        """Start measuring afresh (after a warm-up, or between workloads)."""
        self.profiler.reset()

    def phases(self) -> dict[str, PhaseTimes]:
        return dict(self.profiler.phases)

    def stop(self) -> None:
        """Detach the profiler, restore the graphs, and write the trace if one was asked for."""
        self.engine.model.profiler = OFF
        self.engine.runner.cuda_graphs = self._graphs
        if self._torch_profiler is not None:
            self._torch_profiler.stop()
            assert self.trace is not None
            self._torch_profiler.export_chrome_trace(str(self.trace))
            self._torch_profiler = None


def device_limits(engine: Engine) -> tuple[Limits | None, dict[str, Any] | None]:
    """The cached calibration of the engine's device, as limits and as a record."""
    found = calibration.load(engine.device)
    if found is None:
        return None, None
    return Limits(found.copy_bandwidth, found.matmul_flops), vars(found)


def phase_report(times: PhaseTimes, roofline: Roofline, limits: Limits | None) -> dict[str, Any]:
    """Per step: each op kind's time (all layers), the time between forwards, each layer's
    time; with costs per op and, given `limits`, the fraction of the roofline reached."""
    steps = max(times.steps, 1)
    costs: dict[tuple[str, int], Cost] = defaultdict(Cost)
    for shape, count in times.shapes.items():
        for key, cost in roofline.costs(shape).items():
            costs[key] += cost * count
    by_kind: dict[str, float] = defaultdict(float)
    kind_cost: dict[str, Cost] = defaultdict(Cost)
    layers: dict[int, dict[str, float]] = defaultdict(dict)
    for (kind, layer), seconds in times.ops.items():
        by_kind[kind] += seconds
        for part in kind.split(JOIN):  # a group timed together costs what its ops cost
            kind_cost[kind] += costs.get((part, layer), Cost())
        layers[layer][kind] = seconds / steps * 1e3
    between = times.between / times.between_steps if times.between_steps else 0.0
    step_s = times.forward / steps + between
    rows = []
    for kind, seconds in sorted(by_kind.items(), key=lambda item: -item[1]):
        per_step = seconds / steps
        cost = kind_cost[kind] * (1 / steps)
        row: dict[str, Any] = {
            "op": kind,
            "ms": per_step * 1e3,
            "share": per_step / step_s if step_s else 0.0,
            "bytes": cost.bytes,
            "flops": cost.flops,
            "gb_s": cost.bytes / per_step / 1e9 if per_step else 0.0,
            "tflop_s": cost.flops / per_step / 1e12 if per_step else 0.0,
        }
        if limits is not None and (cost.bytes or cost.flops) and per_step:
            row["limit_fraction"] = limits.floor_seconds(cost) / per_step
            row["bound"] = limits.bound(cost)
        rows.append(row)
    if times.between_steps:
        rows.append({"op": BETWEEN, "ms": between * 1e3, "share": between / step_s})
    return {
        "steps": times.steps,
        "tokens_per_step": sum(s.tokens * n for s, n in times.shapes.items()) / steps,
        "step_ms": step_s * 1e3,
        "forward_ms": times.forward / steps * 1e3,
        "stamps_per_forward": times.stamps / steps,
        "seconds": times.forward + times.between,
        "ops": rows,
        "layers": [
            {"layer": layer, "ms": sum(ops.values()), "ops": ops}
            for layer, ops in sorted(layers.items())
        ],
    }


def profile_report(engine: Engine, phases: dict[str, PhaseTimes]) -> dict[str, Any]:
    """Each phase's report, with the device's cached limits (if calibrated)."""
    limits, record = device_limits(engine)
    roofline = Roofline(engine.model)
    return {
        "limits": record,
        "clock": CUDA_EVENTS if engine.device.type == "cuda" else HOST_CLOCK,
        "phases": {phase: phase_report(times, roofline, limits) for phase, times in phases.items()},
    }


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables: per op kind (with the roofline columns), then per layer."""
    lines = []
    limits = report.get("limits")
    if limits:
        lines.append(
            f"limits ({limits['device']}, measured {limits['date']}): copy "
            f"{limits['copy_bandwidth'] / 1e9:,.1f} GB/s, {limits['matmul_dtype']} matmul "
            f"{limits['matmul_flops'] / 1e12:,.2f} TFLOP/s"
        )
    else:
        lines.append("no limits for this device: `metallic doctor --calibrate` measures them")
    if report.get("clock") == CUDA_EVENTS:
        lines.append(
            "op times: CUDA events recorded on the stream at each op's start (inside the "
            "graphs where steps replay as graphs); each event costs device time, which the op "
            f"times and the forward include; ops joined by {JOIN!r} are timed together"
        )
    else:
        lines.append("op times: the host clock at each op's start")
    for phase, r in report["phases"].items():
        lines += [
            "",
            f"{phase}: {r['steps']} steps, {r['tokens_per_step']:.4g} tokens a step, "
            f"{r['step_ms']:.3f} ms a step (forward {r['forward_ms']:.3f} ms, "
            f"{r['stamps_per_forward']:.0f} stamps)",
            "",
            "| op | ms/step | share | GB/s | TFLOP/s | of limit |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for row in r["ops"]:
            fraction = (
                f"{100 * row['limit_fraction']:.0f}% ({row['bound']})"
                if "limit_fraction" in row
                else ""
            )
            rates = f"{row['gb_s']:,.1f} | {row['tflop_s']:.3f}" if row["op"] != BETWEEN else " | "
            lines.append(
                f"| {row['op']} | {row['ms']:.3f} | {100 * row['share']:.1f}% | {rates} | "
                f"{fraction} |"
            )
        lines.append(f"| total | {r['step_ms']:.3f} | 100.0% | | | |")
        lines += ["", "| layer | ms/step | share | slowest op |", "|---|--:|--:|---|"]
        for layer in r["layers"]:
            name = layer["layer"] if layer["layer"] >= 0 else "outside layers"
            slowest = max(layer["ops"].items(), key=lambda item: item[1])[0]
            share = layer["ms"] / r["step_ms"] if r["step_ms"] else 0.0
            lines.append(f"| {name} | {layer['ms']:.3f} | {100 * share:.1f}% | {slowest} |")
    return "\n".join(lines)
