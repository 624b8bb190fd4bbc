"""Record llama.cpp's outputs on small synthetic llama / qwen2 / qwen3 models (never in CI).

Each model is written with metallic.testing's writer (deterministic for a seed) and a real
vocabulary from ../shared/vocab, then scripts/make_llamacpp_fixtures.py runs it under
llama-cpp-python. tests/models/test_synthetic_agreement.py rewrites the same files and compares.

    python scripts/make_synthetic_fixtures.py --llama-python /root/llvenv/bin/python
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from metallic.testing.synthetic import write_synthetic_model

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO.parent / "shared" / "vocab"

# (fixture name, shape preset, vocabulary file, format mix, seed)
MODELS = [
    ("llama", "tiny-llama", "ggml-vocab-llama-bpe.gguf", "Q4_K_M", 1),
    ("qwen2", "tiny-qwen2", "ggml-vocab-qwen2.gguf", "Q8_0", 2),
    ("qwen3", "tiny-qwen3", "ggml-vocab-qwen2.gguf", "Q5_K_M", 3),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", default="python3", help="python with llama_cpp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, vocab, mix, seed in MODELS:
            model = write_synthetic_model(
                Path(tmp) / f"{name}.gguf", shape, mix, vocab=VOCAB / vocab, seed=seed
            )
            out = REPO / "tests" / "fixtures" / f"llamacpp_synthetic_{name}.json"
            subprocess.run(
                [
                    args.llama_python,
                    str(REPO / "scripts" / "make_llamacpp_fixtures.py"),
                    str(model),
                    str(out),
                    "--long-tokens",
                    "512",
                ],
                check=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
