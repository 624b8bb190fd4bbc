"""How fast does metallic's GGUF tokenizer build and encode? (target: 1 MB of English < 1 s)

The text is Python's own English documentation (``pydoc_data.topics``: prose with code samples),
repeated and cut to exactly 1 MB, so every machine measures the same input. For the default model
(Gemma 3, SentencePiece, 262144 tokens) and each ../shared/vocab file the script times opening
the file, building the tokenizer (without metallic's cache of derived tables; with it, empty:
the build that stores them; with it, filled: the build that loads them; each the best of
--repeats, in process CPU seconds, which other work on a shared machine disturbs less than wall
time), encoding (best of a few runs, with and without parse_special) and decoding, then prints a
table and writes benchmarks/results/tokenizer_speed.json. A SentencePiece tokenizer encodes
texts up to SHORT_TEXT characters without HF's BPE (built at the first longer one): "short s"
is the encoding of the prompt of `metallic run`'s benchmark by a fresh tokenizer, "1st enc s"
the first encoding of the megabyte, HF's BPE build included where it was left until then.

    .venv/bin/python benchmarks/tokenizer_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pydoc_data.topics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metallic.gguf.default_model import default_model_path
from metallic.gguf.reader import open_gguf
from metallic.gguf.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB_DIR = Path(os.environ.get("METALLIC_SHARED", REPO.parent / "shared")) / "vocab"
RESULTS = REPO / "benchmarks" / "results" / "tokenizer_speed.json"
TEXT_BYTES = 1_000_000
PROMPT = "The capital of France is"  # what benchmarks/gpu_startup.py runs


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


def build_seconds(repeats: int, work: Callable[[], Any]) -> float:
    """The least process CPU time of ``repeats`` runs of ``work``."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return min(times)


def measure(name: str, path: Path, text: str, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    metadata = open_gguf(path).metadata
    opened = time.perf_counter()
    build_s = build_seconds(repeats, lambda: Tokenizer.from_metadata(metadata))
    with tempfile.TemporaryDirectory() as folder:
        entries = Path(folder)

        def store() -> None:
            for entry in entries.iterdir():
                entry.unlink()
            Tokenizer.from_metadata(metadata, entries)

        store_s = build_seconds(repeats, store)
        cached_s = build_seconds(repeats, lambda: Tokenizer.from_metadata(metadata, entries))
        fresh = [Tokenizer.from_metadata(metadata, entries) for _ in range(repeats)]
        short_s = build_seconds(repeats, lambda: fresh.pop().encode(PROMPT))
    tokenizer = Tokenizer.from_metadata(metadata)
    megabytes = len(text.encode()) / 1e6
    first_s, _ = best_of(1, lambda: tokenizer.encode(text, add_special=False))
    encode_s, ids = best_of(repeats, lambda: tokenizer.encode(text, add_special=False))
    special_s, _ = best_of(repeats, lambda: tokenizer.encode(text, parse_special=True))
    decode_s, decoded = best_of(repeats, lambda: tokenizer.decode(ids))
    return {
        "vocab": name,
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "open_s": round(opened - start, 3),
        "build_s": round(build_s, 3),
        "build_storing_s": round(store_s, 3),
        "build_from_cache_s": round(cached_s, 3),
        "short_encode_s": round(short_s, 4),
        "first_encode_s": round(first_s, 3),
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
        f"{'vocab':<24}{'kind':>5}{'vocab':>8}{'open s':>8}{'build s':>9}{'storing':>9}"
        f"{'cached':>8}{'short s':>9}{'1st enc s':>10}{'tokens':>9}"
        f"{'encode s':>10}{'MB/s':>7}{'+special s':>12}{'decode s':>10}{'round trip':>12}"
    )
    print(f"encoding {len(text.encode()):,} bytes of English ({len(text):,} characters)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['vocab']:<24}{row['kind']:>5}{row['vocab_size']:>8}{row['open_s']:>8.2f}"
            f"{row['build_s']:>9.2f}{row['build_storing_s']:>9.2f}{row['build_from_cache_s']:>8.2f}"
            f"{row['short_encode_s']:>9.4f}{row['first_encode_s']:>10.3f}{row['tokens']:>9}"
            f"{row['encode_s']:>10.3f}"
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
