"""How fast does metallic's GGUF tokenizer build and encode? (target: 1 MB of English < 1 s)

The text is Python's own English documentation (``pydoc_data.topics``: prose with code samples),
repeated and cut to exactly 1 MB, so every machine measures the same input. For the default model
(Gemma 3, SentencePiece, 262144 tokens) and each ../shared/vocab file the script times opening
the file, building the tokenizer, encoding (best of a few runs, with and without parse_special)
and decoding, then prints a table and writes benchmarks/results/tokenizer_speed.json.

    .venv/bin/python benchmarks/tokenizer_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pydoc_data.topics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metallic.gguf.default_model import default_model_path
from metallic.gguf.reader import open_gguf
from metallic.gguf.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB_DIR = REPO.parent / "shared" / "vocab"
RESULTS = REPO / "benchmarks" / "results" / "tokenizer_speed.json"
TEXT_BYTES = 1_000_000


def english_megabyte() -> str:
    """Exactly 1 MB (UTF-8) of English documentation text."""
    topics = pydoc_data.topics.topics
    source = "\n\n".join(topics[key] for key in sorted(topics))
    text = source * (TEXT_BYTES // len(source.encode()) + 1)
    return text.encode()[:TEXT_BYTES].decode(errors="ignore")


def best_of(repeats: int, work: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest wall time of ``repeats`` runs, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(name: str, path: Path, text: str, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    metadata = open_gguf(path).metadata
    opened = time.perf_counter()
    tokenizer = Tokenizer.from_metadata(metadata)
    built = time.perf_counter()
    megabytes = len(text.encode()) / 1e6
    encode_s, ids = best_of(repeats, lambda: tokenizer.encode(text, add_special=False))
    special_s, _ = best_of(repeats, lambda: tokenizer.encode(text, parse_special=True))
    decode_s, decoded = best_of(repeats, lambda: tokenizer.decode(ids))
    return {
        "vocab": name,
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "open_s": round(opened - start, 3),
        "build_s": round(built - opened, 3),
        "tokens": len(ids),
        "encode_s": round(encode_s, 3),
        "encode_mb_per_s": round(megabytes / encode_s, 2),
        "encode_parse_special_s": round(special_s, 3),
        "decode_s": round(decode_s, 3),
        "round_trip": decoded == text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="encode runs to take the best of")
    args = parser.parse_args()
    text = english_megabyte()
    targets = [("gemma3 (default model)", default_model_path())]
    targets += [
        (path.name.removeprefix("ggml-vocab-").removesuffix(".gguf"), path)
        for path in sorted(VOCAB_DIR.glob("ggml-vocab-*.gguf"))
    ]
    rows = [measure(name, path, text, args.repeats) for name, path in targets]

    header = (
        f"{'vocab':<24}{'kind':>5}{'vocab':>8}{'open s':>8}{'build s':>9}{'tokens':>9}"
        f"{'encode s':>10}{'MB/s':>7}{'+special s':>12}{'decode s':>10}{'round trip':>12}"
    )
    print(f"encoding {len(text.encode()):,} bytes of English ({len(text):,} characters)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['vocab']:<24}{row['kind']:>5}{row['vocab_size']:>8}{row['open_s']:>8.2f}"
            f"{row['build_s']:>9.2f}{row['tokens']:>9}{row['encode_s']:>10.3f}"
            f"{row['encode_mb_per_s']:>7.2f}{row['encode_parse_special_s']:>12.3f}"
            f"{row['decode_s']:>10.3f}{row['round_trip']!s:>12}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "question": "tokenizer build time and encode speed on 1 MB of English",
        "text_bytes": len(text.encode()),
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
