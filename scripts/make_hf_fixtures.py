"""Record HF transformers' float32 outputs on a GGUF model as test fixtures (never in CI).

A second reference beside llama.cpp, written by other people: transformers dequantizes the GGUF
with gguf-py and runs its own PyTorch implementation in float32, with no activation rounding.
Uses the token ids of the llama.cpp fixture (same prompts, same long text) so both references see
identical inputs. Needs a venv with transformers, accelerate, torch and gguf:

    python scripts/make_hf_fixtures.py MODEL.gguf tests/fixtures/llamacpp_X.json \
        tests/fixtures/hf_X.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

TOP = 20


def top_logits(row: torch.Tensor) -> list[list[float]]:
    values, ids = row.topk(TOP)
    return [[int(i), float(v)] for i, v in zip(ids, values, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("llamacpp_fixture", help="fixture whose token ids are reused")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()

    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    source = json.loads(Path(args.llamacpp_fixture).read_text())
    prompts = []
    with torch.no_grad():
        for case in source["prompts"]:
            ids = torch.tensor([case["prompt_ids"]])
            last = model(ids).logits[0, -1]
            generated = model.generate(
                ids, max_new_tokens=args.tokens, do_sample=False, min_new_tokens=args.tokens
            )[0, ids.shape[1] :].tolist()
            prompts.append(
                {
                    "text": case["text"],
                    "prompt_ids": case["prompt_ids"],
                    "greedy_ids": generated,
                    "last_top_logits": top_logits(last),
                }
            )
        tf = source["teacher_forcing"]
        logits = model(torch.tensor([tf["ids"]])).logits[0]
    fixture = {
        "model": path.name,
        "reference": "HF transformers float32 (GGUF dequantized by gguf-py)",
        "prompts": prompts,
        "teacher_forcing": {
            "ids": tf["ids"],
            "argmax": logits.argmax(-1).tolist(),
            "sampled_positions": tf["sampled_positions"],
            "sampled_top_logits": [top_logits(logits[p]) for p in tf["sampled_positions"]],
        },
    }
    Path(args.out).write_text(json.dumps(fixture) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
