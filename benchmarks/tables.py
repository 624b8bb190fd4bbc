"""The markdown tables of BENCHMARKS.md from a bench record and `metallic bench --json` output.

    python benchmarks/tables.py RECORD.json [BENCH.json ...]

From the record (the format of benchmarks/common.py; gpu_bench.py writes one): per model and
test, metallic's tokens/s beside llama.cpp's, their ratio and the bandwidth floor. Given the JSON
documents `metallic bench --json` wrote in the same run (gpu_bench.py's `bench-MODEL.json`),
metallic's figures carry their standard deviation over the repetitions, and each model's decode
profile follows: time per op with the fraction of the device's limit it reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TITLES = {
    "gemma3-270m-q4_k_m": "Gemma 3 270M Q4_K_M",
    "llama3-8b-q4_k_m": "Llama-3-8B Q4_K_M (synthetic)",
}
ENGINES = ("metallic", "llama.cpp", "floor")


def title(model: str) -> str:
    return TITLES.get(model, model)


def number(value: float) -> str:
    """Thousands separated; a decimal below 100 (small rates, milliseconds)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def comparison_table(record: dict[str, Any], docs: list[dict[str, Any]]) -> str:
    """One line per model and test of the record, in the record's order."""
    values: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in record["rows"]:
        values.setdefault((r["model"], r["test"]), {})[r["engine"]] = r
    spread = {
        (doc["model"]["name"], result["test"]): result["stddev_ts"]
        for doc in docs
        for result in doc["results"]
    }
    lines = [
        "| model | test | metallic | llama.cpp | metallic / llama.cpp | floor |",
        "|---|---|---|---|---|---|",
    ]
    for (model, test), engines in values.items():
        cells = {}
        for engine in ENGINES:
            r = engines.get(engine)
            unit = "" if r is None or r["unit"] == "tok/s" else f" {r['unit']}"
            cells[engine] = "–" if r is None else number(r["value"]) + unit
        if (model, test) in spread and "metallic" in engines:
            cells["metallic"] += f" ± {number(spread[model, test])}"
        ours, theirs = engines.get("metallic"), engines.get("llama.cpp")
        ratio = f"{ours['value'] / theirs['value']:.2f}" if ours and theirs else "–"
        lines.append(
            f"| {title(model)} | {test} | {cells['metallic']} | {cells['llama.cpp']} | {ratio} "
            f"| {cells['floor']} |"
        )
    return "\n".join(lines)


def profile_table(doc: dict[str, Any]) -> str:
    """The decode profile of a bench document: per op, then the time between forwards."""
    profile = doc["profile"]
    decode = profile["phases"]["decode"]
    limits = profile.get("limits")
    where = (
        f"limits: copy {number(limits['copy_bandwidth'] / 1e9)} GB/s, {limits['matmul_dtype']} "
        f"matmul {number(limits['matmul_flops'] / 1e12)} TFLOP/s"
        if limits
        else "the device's limits not measured"
    )
    lines = [
        f"{title(doc['model']['name'])}, decode: {decode['step_ms']:.3f} ms a step over "
        f"{decode['steps']} steps, ops timed by {profile.get('clock', 'host clock')} "
        f"({decode.get('stamps_per_forward', 0):.0f} a forward); {where}.",
        "",
        "| op | ms / step | share | GB/s | of the limit |",
        "|---|---|---|---|---|",
    ]
    for r in decode["ops"]:
        rate = number(r["gb_s"]) if "gb_s" in r else ""
        limit = f"{100 * r['limit_fraction']:.0f}% ({r['bound']})" if "bound" in r else ""
        lines.append(f"| {r['op']} | {r['ms']:.3f} | {100 * r['share']:.0f}% | {rate} | {limit} |")
    return "\n".join(lines)


def render(record: dict[str, Any], docs: list[dict[str, Any]], name: str | None = None) -> str:
    """Where the figures come from, the comparison, and each document's decode profile."""
    source = f" (record: `benchmarks/records/{name}`)" if name else ""
    parts = [
        f"Device: {record['device']}, {record['date']}, code at `{record['commit']}`. "
        f"Command: `{record['command']}`{source}.",
        comparison_table(record, docs),
    ]
    parts += [profile_table(doc) for doc in docs if "profile" in doc]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, help="a record (benchmarks/common.py)")
    parser.add_argument("bench", type=Path, nargs="*", help="metallic bench --json documents")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.record.read_text())
        docs = [json.loads(path.read_text()) for path in args.bench]
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if not isinstance(record, dict) or "rows" not in record:
        parser.error(f"{args.record} is not a record: no rows")
    print(render(record, docs, args.record.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
