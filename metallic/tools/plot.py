"""Pictures of a bench run: tokens/s against batch size and prompt length, and where a decode
step's time goes, with the fraction of the device's limit each op reached.

matplotlib is an optional extra (`pip install metallic[plot]`): only `--plot` imports it, through
its object API (no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metallic.errors import MetallicError


def plot_bench(doc: dict[str, Any], path: Path) -> None:
    """Write a PNG of the bench document `doc` (tools/bench.py) to `path`."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MetallicError("--plot needs matplotlib: pip install 'metallic[plot]'") from None
    results = doc["results"]
    panels = []
    batch = [r for r in results if r["kind"] == "batch"]
    if batch:
        panels.append(("batch", batch))
    panels.append(("pp", [r for r in results if r["kind"] == "pp"]))
    decode = doc.get("profile", {}).get("phases", {}).get("decode")
    if decode:
        panels.append(("profile", decode))
    figure = Figure(figsize=(4.6 * len(panels), 3.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, data) in zip(axes, panels, strict=True):
        if kind == "profile":
            _breakdown(ax, data)
            continue
        x = [r["batch"] if kind == "batch" else r["prompt"] for r in data]
        y = [r["avg_ts"] for r in data]
        ax.errorbar(x, y, yerr=[r["stddev_ts"] for r in data], marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_ylabel("tokens/s")
        if kind == "batch":
            settings = doc["settings"]
            ax.set_xlabel("sequences at once")
            ax.set_title(
                f"decode, {settings['batch_prompt']}-token prompts + {data[0]['generate']}",
                fontsize=10,
            )
        else:
            ax.set_xlabel("prompt tokens")
            ax.set_title("prompt processing", fontsize=10)
    model, device = doc["model"], doc["device"]
    figure.suptitle(f"metallic {doc['versions']['metallic']}: {model['name']} on {device['name']}")
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as err:
        raise MetallicError(f"cannot write {path}: {err.strerror or err}") from None


def _breakdown(ax: Any, phase: dict[str, Any]) -> None:
    """Horizontal bars of ms per step by op, labelled with the roofline fraction reached."""
    rows = list(reversed(phase["ops"]))  # the slowest on top
    names = [r["op"] for r in rows]
    times = [r["ms"] for r in rows]
    bars = ax.barh(names, times, color=["0.6" if "bound" not in r else "C0" for r in rows])
    for bar, row in zip(bars, rows, strict=True):
        if "limit_fraction" in row:
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {100 * row['limit_fraction']:.0f}% of limit",
                va="center",
                fontsize=7,
            )
    ax.set_xlabel("ms per step")
    ax.set_xlim(right=max(times) * 1.45 if times else 1)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"decode step: {phase['step_ms']:.2f} ms", fontsize=10)
