"""Check that llama.cpp loads and runs the synthetic GGUF models (a dev check, not run in CI).

Writes a model per architecture, mix and vocabulary with metallic.testing.synthetic, then loads
each one with llama-cpp-python in a separate interpreter (a crash there is one failed row, not a
dead script), evaluates a short prompt and checks every logit is finite. Prints a table and exits
non-zero if any row failed.

    .venv/bin/python scripts/check_synthetic_llamacpp.py [--llama-python /root/llvenv/bin/python]
        [--mixes Q8_0 Q4_K_M ...] [--full]

Real vocabularies: ../shared/vocab (llama-bpe for llama, qwen2 for qwen2/qwen3) and the default
model's tokenizer for gemma3. ``--full`` adds every full-size preset in Q4_K_M (Llama-3-8B is a
4.9 GB file: about 15 s to write and 20 s to run on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from metallic.gguf.default_model import default_model_path
from metallic.testing.synthetic import MIXES, PRESETS, write_synthetic_model

REPO = Path(__file__).resolve().parents[1]
VOCAB_DIR = REPO.parent / "shared" / "vocab"
PROMPT = "Hello world, the quick brown fox jumps over the lazy dog."

PROBE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=128, n_threads=2, logits_all=True, verbose=True)
tokens = llm.tokenize(sys.argv[2].encode(), add_bos=True)
llm.eval(tokens)
scores = np.asarray(llm.scores[: llm.n_tokens])
print(json.dumps({
    "n_tokens": len(tokens),
    "finite": bool(np.isfinite(scores).all()),
    "max_abs": float(np.abs(scores).max()),
}))
"""


def _real_vocab(preset: str) -> Path:
    """The family's own tokenizer: TinyLlama's is Llama 2's SentencePiece, Llama 3's is BPE."""
    arch = PRESETS[preset].arch
    if arch == "gemma3":
        return default_model_path()
    if preset == "tinyllama-1.1b":
        return VOCAB_DIR / "ggml-vocab-llama-spm.gguf"
    return VOCAB_DIR / ("ggml-vocab-llama-bpe.gguf" if arch == "llama" else "ggml-vocab-qwen2.gguf")


def _probe(llama_python: str, model: Path) -> dict:
    """Load and run ``model`` in llama.cpp; the probe's JSON, or the reason it failed."""
    try:
        done = subprocess.run(
            [llama_python, "-c", PROBE, str(model), PROMPT],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    lines = [ln for ln in done.stderr.splitlines() if "error" in ln.lower() or "fail" in ln.lower()]
    return {"error": (lines[-1] if lines else done.stderr.strip()[-200:]) or "crashed"}


def _row(*cells: object) -> str:
    """One table line: preset, mix, vocab, loads, tokens, finite, max |logit|."""
    widths = (15, 7, 10, 6, 6, 6, 10)
    return " ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", default="/root/llvenv/bin/python")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES))
    parser.add_argument("--full", action="store_true", help="also the full-size presets")
    args = parser.parse_args()

    cases = [
        (preset, mix, vocab)
        for preset in ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3")
        for mix in args.mixes
        for vocab in ("synthetic", "real")
    ]
    if args.full:
        cases += [(p, "Q4_K_M", "real") for p in PRESETS if not p.startswith("tiny-")]

    failures = 0
    header = _row("preset", "mix", "vocab", "loads", "tokens", "finite", "max|logit|")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for preset, mix, vocab in cases:
            path = Path(tmp) / f"{preset}-{mix}-{vocab}.gguf"
            vocab_arg = _real_vocab(preset) if vocab == "real" else None
            write_synthetic_model(path, preset, mix, vocab=vocab_arg)
            result = _probe(args.llama_python, path)
            path.unlink()
            ok = "error" not in result and result["finite"]
            failures += not ok
            if "error" in result:
                print(_row(preset, mix, vocab, "NO", "-", "-", "-"))
                print(f"    {result['error']}")
            else:
                finite = "yes" if result["finite"] else "NO"
                peak = f"{result['max_abs']:.3g}"
                print(_row(preset, mix, vocab, "yes", result["n_tokens"], finite, peak))
            sys.stdout.flush()
    print(f"{len(cases) - failures}/{len(cases)} loaded with finite logits")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
