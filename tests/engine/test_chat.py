import pytest

from metallic.engine.chat import ChatTemplate
from metallic.errors import MetallicError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
]


def test_builtin_gemma_format():
    meta = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"],
        "tokenizer.ggml.bos_token_id": 2,
    }
    template = ChatTemplate.for_model(meta)
    assert template.render(MESSAGES) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_builtin_chatml_for_qwen():
    template = ChatTemplate.for_model({"general.architecture": "qwen2"})
    assert template.render(MESSAGES[1:2]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_template_when_its_tokens_exist():
    tokens = ["<|begin_of_text|>", "<|start_header_id|>"]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.bos_token_id": 0,
    }
    out = ChatTemplate.for_model(meta).render(MESSAGES[1:2])
    assert out == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_file_template_wins_and_errors_are_one_line():
    meta = {"tokenizer.chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}
    assert ChatTemplate.for_model(meta).render(MESSAGES[1:2]) == "[Hi]"
    raising = {"tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"}
    with pytest.raises(MetallicError, match="roles must alternate"):
        ChatTemplate.for_model(raising).render(MESSAGES)
    with pytest.raises(MetallicError, match="does not parse"):
        ChatTemplate("{% for %}")
