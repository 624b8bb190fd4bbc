"""Record llama.cpp's outputs on a model as test fixtures (run by hand, never in CI).

For each prompt: llama.cpp's token ids, its greedy continuation and the top logits of the last
prompt position; for a long text: the argmax of every teacher-forced position plus top logits at a
sample of positions. Usage (in a venv with llama-cpp-python built from PyPI):

    python scripts/make_llamacpp_fixtures.py MODEL.gguf tests/fixtures/llamacpp_NAME.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

PROMPTS = [
    "The capital of France is",
    "Question: How many legs does a spider have?\nAnswer:",
    "def fibonacci(n):\n    ",
    "La recette traditionnelle de la ratatouille commence par",
    "Counting: 1, 2, 3, 4, 5,",
    "東京は日本の首都で、",
    "Once upon a time, in a small village by the sea, there lived",
    "The chemical formula of water is",
]

LONG_TEXT = """\
The lighthouse keeper had kept a logbook for thirty-one years, and every entry began the same way:
the date, the wind, the state of the sea. On the morning the supply boat failed to arrive, he wrote
those three things as usual and then, after a long pause, a fourth: "No boat." It was the first time
the island had been cut off for more than a week since the winter of the great storm.

He was not worried about food. The storeroom held tins of beans and peaches, sacks of flour, and a
barrel of salted fish that he disliked but would eat if he had to. What worried him was the lamp.
The lamp needed paraffin, and the paraffin came with the boat. He measured what was left with a
wooden dipstick, wrote the figure down, and did a small calculation in the margin: at the usual
rate, eleven nights. If he trimmed the wick and lit it an hour later each evening, perhaps fourteen.

Meanwhile, in the harbour town on the mainland, the boat's engine lay in pieces on a workbench.
The mechanic, a young woman named Ines who had taken over the workshop from her uncle, was certain
the fault was in the fuel pump. She had ordered a replacement by telephone, but the part would
have to come by train from the city, and the line had been closed by a landslide.

def remaining_nights(fuel_litres: float, litres_per_night: float) -> int:
    # Whole nights of light left; a partial night still counts as darkness.
    if litres_per_night <= 0:
        raise ValueError("consumption must be positive")
    return int(fuel_litres // litres_per_night)

print(remaining_nights(23.5, 2.1))  # eleven nights, as in the keeper's margin

Ines did not wait for the train. She took apart an old pump from a tractor that had been rusting
behind the workshop for years, cleaned every valve, cut a new gasket from a sheet of cork, and by
the evening of the fifth day the engine turned over, coughed twice, and ran. The harbour master
shook his head and said it would never last the crossing. Ines said it only had to last once.

They left at dawn on the sixth day: the skipper, Ines, and forty litres of paraffin in four red
cans lashed to the deck. The sea was grey and heavy, the swell coming in long ridges from the
south-west. Halfway across, the engine note changed, dropped, and then steadied again, and Ines
sat beside it for the rest of the journey with one hand resting on the housing, as if she could
hold it together by listening.

On the island, the keeper saw them first as a dark fleck between two waves. He went down to the
landing stage with a rope over his shoulder. When the boat came alongside he caught the line,
made it fast, and looked for a long moment at the red cans. Then he looked at Ines, whom he had
never met, and said the only thing that seemed adequate: "Thank you. Come up and have some tea.
I am afraid there is only salted fish." She laughed, and that evening the lamp was lit on time.
"""

TOP = 20  # logits kept per recorded position
GGML_TYPE_F32 = 0


def top_logits(row: np.ndarray) -> list[list[float]]:
    ids = np.argsort(-row)[:TOP]
    return [[int(i), float(row[i])] for i in ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument("--long-tokens", type=int, default=640, help="teacher-forced positions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    llm = Llama(
        model_path=args.model,
        n_ctx=2048,
        # One token per micro-batch: every position takes ggml's decode (GEMV) path, whose
        # activation rounding metallic's "ggml" numerics reproduce; batched GEMM kernels
        # quantize activation rows in interleaved groups and round slightly differently.
        n_batch=1,
        n_ubatch=1,
        logits_all=True,
        n_threads=args.threads,
        flash_attn=False,  # the CPU flash-attention path accumulates V in f16
        type_k=GGML_TYPE_F32,  # f32 KV cache: compare models, not cache rounding
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    prompts = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        generated = []
        for _ in range(args.tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            llm.eval([token])
        prompts.append(
            {
                "text": text,
                "prompt_ids": ids,
                "greedy_ids": generated,
                "greedy_text": llm.detokenize(generated).decode("utf-8", "replace"),
                "last_top_logits": top_logits(last),
            }
        )
        print(f"{text[:40]!r}: {prompts[-1]['greedy_text'][:60]!r}", file=sys.stderr)

    ids = llm.tokenize(LONG_TEXT.encode(), add_bos=True, special=True)[: args.long_tokens]
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
    sample = list(range(0, len(ids), max(1, len(ids) // 16)))
    fixture = {
        "model": Path(args.model).name,
        "llama_cpp": __import__("llama_cpp").__version__,
        "settings": "n_ubatch=1, f32 KV cache, flash attention off, 2 threads",
        "prompts": prompts,
        "teacher_forcing": {
            "ids": ids,
            "argmax": [int(i) for i in scores.argmax(axis=1)],
            "sampled_positions": sample,
            "sampled_top_logits": [top_logits(scores[p]) for p in sample],
        },
    }
    Path(args.out).write_text(json.dumps(fixture) + "\n")
    print(f"wrote {args.out}: {len(prompts)} prompts, {len(ids)} teacher-forced tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
