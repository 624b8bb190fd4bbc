"""Write tests/fixtures/tokenizer_NAME.json: llama.cpp's tokenization of a varied corpus.

Run with the llama-cpp-python venv (a dev-only reference, never a dependency of metallic):

    /root/llvenv/bin/python scripts/make_tokenizer_fixtures.py MODEL.gguf [--vocab smollm2]

MODEL.gguf is the model of the vocabulary named by --vocab: ``gemma3`` (the default: Gemma 3
270M, ``metallic.gguf.default_model.default_model_path()`` prints where it is) or ``smollm2``
(SmolLM2-135M-Instruct, ``metallic pull smollm2-135m-instruct``). Only the vocabulary is loaded
(``vocab_only``). For every corpus string (the shared corpus plus the vocabulary's own texts) and
every combination of add_special / parse_special the fixture stores llama.cpp's ids and its
detokenization of them (``llama_detokenize``, special tokens rendered and not); for the vocabulary
it stores the BOS/EOS ids and flags, the end-of-generation set, the control tokens, and the
piece (``llama_token_to_piece``) of a sample of tokens. tests/gguf/test_tokenizer.py compares
metallic's tokenizer with all of it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parents[1]

ENGLISH = (
    "Tokenizers split text into pieces that a language model can handle. A good tokenizer keeps"
    " frequent words whole, breaks rare words into meaningful parts, and never loses a byte: any"
    " text, in any script, must come back unchanged after encoding and decoding. The details"
    " matter, because a model only ever sees the ids it was trained with."
)

CORPUS = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    " Hello world",
    "   three leading spaces",
    "trailing spaces   ",
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    ENGLISH,
    "I've been 'told' he's there, 'RE you sure? We'Ve a'lL",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\n\n\n",
    "\n\n\nleading newlines",
    "mixed \t \n \r\n whitespace",
    "\r\n windows line endings\r\n",
    "word" + " " * 40 + "word",
    "\t" * 35 + "x",
    "\n" * 33 + "y",
    "日本語のテキストを分割します。",
    "中文分词测试：你好，世界！",
    "한국어 텍스트입니다",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם, מה שלומך?",
    "Привет, мир! Как дела?",
    "Ελληνικά κείμενα",
    "हिन्दी पाठ",
    "Café naïve façade résumé coöperate",
    "Cafe\u0301 with a combining accent",
    "Ünïcödé ÜBER straße",
    "Mixed 中文 and English with العربية inside",
    "emoji 🦙🔥👍🏽 ❤️ 🇫🇷 👨\u200d👩\u200d👧",
    "numbers 0 12 345 6789 3.14159 -42 1e10 1,000,000",
    "phone +1 (555) 123-4567, date 2024-11-25",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    'int main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}',
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<table><tr><td>cell</td></tr></table>",
    "<b>bold</b> and <i>italic</i> and <s>struck</s>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text with a literal bos<eos>",
    "<pad><unk><mask>[multimodal]",
    "<start_of_image> image <end_of_image>",
    "<unused0> and <unused98>",
    "almost special <start_of_turn and <end_of_turn >",
    "URLs https://example.com/path?q=1&r=two#frag and someone@example.org",
    "zero\u200bwidth\u200djoiner",
    "non-breaking\u00a0space and\u3000ideographic space",
    "private use \ue000 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "▁ a literal SentencePiece marker ▁▁",
    "repeated aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ababababababab",
    "punctuation!!! ??? ... ,,, ;;; ::: ---",
    "quotes 'single' \"double\" `back` “curly” ‘curly’ «guillemets»",
    "math ∑ x² ≤ √y ± ∞ ≠ π",
    "control chars \x01\x02\x7f",
]

# Texts for each vocabulary's own quirks. SmolLM2's byte-level vocabulary has no token for the
# bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2 and 0xF5-0xFF, which llama.cpp
# drops.
EXTRA_CORPUS = {
    "gemma3": [],
    "smollm2": [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|> and <|im_end|> as plain text",
        "<repo_name>metallic<file_sep>cli.py<filename>x<jupyter_code>",
        "digits 1234567890 and 3.14159 split one by one",
        "a\x04b",
        "\x04\x06\x13\x14\x16\x1d",
        "word\x04 word \x06word\x13\n\x14 \x16\x1dend",
        "kept control bytes \x00\x01\x05\x07\x08\x1b\x1c\x1e\x1f and dropped \x1d",
        "plane-5 character \U00050000 starts with the byte 0xF1",
        "mixed ab\x04ab\x06ab and Café\x1dnaïve",
    ],
}


def detokenize(vocab: llama_cpp.llama_vocab_p, ids: list[int], special: bool) -> str:
    tokens = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buffer = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, size, False, special)
    if n < 0:
        raise RuntimeError(f"llama_detokenize needs {-n} bytes")
    return buffer.raw[:n].decode("utf-8", errors="replace")  # as metallic shows bad bytes


def piece(vocab: llama_cpp.llama_vocab_p, token_id: int) -> bytes:
    buffer = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(vocab, token_id, buffer, 1024, 0, True)
    if n < 0:
        raise RuntimeError(f"token {token_id} renders as more than 1024 bytes")
    return buffer.raw[:n]


def ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids as [first, last + 1] runs, which keeps thousands of control ids short."""
    runs: list[list[int]] = []
    for token_id in ids:
        if runs and runs[-1][1] == token_id:
            runs[-1][1] += 1
        else:
            runs.append([token_id, token_id + 1])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the GGUF file of the vocabulary")
    parser.add_argument("--vocab", choices=sorted(EXTRA_CORPUS), default="gemma3")
    args = parser.parse_args()
    output = REPO / "tests" / "fixtures" / f"tokenizer_{args.vocab}.json"
    llm = llama_cpp.Llama(model_path=str(args.model), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    sample = sorted({*range(512), *range(0, n_vocab, 251)})
    header = {
        "source": f"llama-cpp-python {llama_cpp.__version__} (vocab_only), {args.model.name}",
        "vocab_size": n_vocab,
        "bos_id": llama_cpp.llama_vocab_bos(vocab),
        "eos_id": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": llama_cpp.llama_vocab_get_add_bos(vocab),
        "add_eos": llama_cpp.llama_vocab_get_add_eos(vocab),
        "eog_ids": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "control_ranges": ranges(
            [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_control(vocab, i)]
        ),
        "pieces": {str(i): piece(vocab, i).hex() for i in sample},
    }
    cases = []
    corpus = CORPUS + EXTRA_CORPUS[args.vocab]
    for text in corpus:
        for add_special in (False, True):
            for parse_special in (False, True):
                ids = llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)
                cases.append(
                    {
                        "text": text,
                        "add_special": add_special,
                        "parse_special": parse_special,
                        "ids": ids,
                        "decoded": detokenize(vocab, ids, special=True),
                        "decoded_plain": detokenize(vocab, ids, special=False),
                    }
                )
    lines = ["{"]
    lines += [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
    lines.append('  "cases": [')
    lines += [f"    {json.dumps(case, ensure_ascii=False)}," for case in cases]
    lines[-1] = lines[-1].rstrip(",")
    lines += ["  ]", "}"]
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases ({len(corpus)} strings) to {output.relative_to(REPO)}")


if __name__ == "__main__":
    main()
