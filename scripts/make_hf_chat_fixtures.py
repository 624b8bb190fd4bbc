"""Record HF transformers' greedy chat replies on a GGUF chat model as a test fixture (never in CI).

An independent float32 implementation of the same file: transformers dequantizes the GGUF with
gguf-py, renders each conversation with the file's chat template (its own Jinja code) and
tokenizes it with its own tokenizer, then decodes greedily until an end-of-generation token or
the token limit. At every generated position the fixture keeps the top two logits, so a test can
tell a near-tie (where float rounding may pick either token) from a real disagreement. Needs a
venv with transformers, torch and gguf:

    python scripts/make_hf_chat_fixtures.py SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/fixtures/hf_chat_smollm2_135m.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "Name a large animal."},
        {"role": "assistant", "content": "An elephant."},
        {"role": "user", "content": "And a small one?"},
    ],
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument(
        "--stop-ids",
        type=int,
        nargs="+",
        default=[0, 2, 4],
        help="end-of-generation ids (llama.cpp's set for SmolLM2: <|endoftext|> <|im_end|>"
        " <reponame>)",
    )
    args = parser.parse_args()

    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cases = []
    with torch.no_grad():
        for messages in CONVERSATIONS:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=args.tokens,
                do_sample=False,
                eos_token_id=args.stop_ids,
                pad_token_id=args.stop_ids[0],
                output_logits=True,
                return_dict_in_generate=True,
            )
            reply = out.sequences[0, len(ids) :].tolist()
            top2 = []
            for row in out.logits:
                values, top_ids = row[0].float().topk(2)
                top2.append([[int(i), float(v)] for i, v in zip(top_ids, values, strict=True)])
            cases.append(
                {
                    "messages": messages,
                    "prompt_ids": ids,
                    "reply_ids": reply,
                    "reply": tokenizer.decode(reply, skip_special_tokens=True),
                    "top2_logits": top2,
                }
            )
            print(repr(cases[-1]["reply"]))
    fixture = {
        "model": path.name,
        "reference": "HF transformers float32 (GGUF dequantized by gguf-py), greedy",
        "stop_ids": args.stop_ids,
        "max_tokens": args.tokens,
        "cases": cases,
    }
    lines = ["{"]
    lines += [
        f"  {json.dumps(key)}: {json.dumps(value)},"
        for key, value in fixture.items()
        if key != "cases"
    ]
    lines.append('  "cases": [')
    lines += [f"    {json.dumps(case, ensure_ascii=False)}," for case in cases]
    lines[-1] = lines[-1].rstrip(",")
    lines += ["  ]", "}"]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
