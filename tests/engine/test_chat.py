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


# -- untrusted templates: the sandbox and its bounds (issue 15) -----------------------------------

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
        ("{{ 'x' * 10**9 }}", "a repetition would pass the bound"),
        ("{{ messages * 10**8 }}", "a repetition would pass the bound"),
        ("{{ 7 ** (10**9) }}", "a power would pass the bound"),
        ("{{ 'x'.ljust(10**9) }}", "a string of 1,000,000,000 characters"),
        ("{% for i in range(99999) %}{{ 'y' * 99 }}{% endfor %}", "the rendered prompt would pass"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
        ("{{ 1 / 0 }}", "division by zero"),
        ("{{ messages.append(1) }}", "is unsafe"),
        ("{{ ''.__class__.__mro__ }}", "is unsafe"),
    ],
)
def test_hostile_templates_end_in_one_line(source: str, words: str) -> None:
    from metallic.engine.chat import TemplateError

    with pytest.raises(TemplateError, match="chat template") as err:
        ChatTemplate(source).render(HI)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_template_that_runs_too_long_is_stopped() -> None:
    """A loop of 10**10 steps (no single range is too big) ends at the time bound."""
    from metallic.engine.chat import TemplateError

    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    template = ChatTemplate(source, time_limit=0.2)
    with pytest.raises(TemplateError, match=r"ran past 0\.2 s"):
        template.render(HI)
    # the timer is gone: later work in this thread is not interrupted
    assert ChatTemplate("{{ messages[0]['content'] }}", time_limit=0.2).render(HI) == "Hi"
    busy = sum(i * i for i in range(3_000_000))
    assert busy > 0


def test_a_template_within_the_bounds_renders_unchanged() -> None:
    template = ChatTemplate("{% for i in range(3) %}{{ i }}{{ '-' * 2 }}{% endfor %}")
    assert template.render(HI) == "0--1--2--"


# -- the history that fits the context ------------------------------------------------------------


def _turns(n: int) -> list[dict[str, str]]:
    history = [{"role": "system", "content": "sys"}]
    for i in range(n):
        history.append({"role": "user", "content": f"q{i}"})
        history.append({"role": "assistant", "content": f"a{i}"})
    return history


def test_fit_history_drops_oldest_turns_and_keeps_the_system_prompt() -> None:
    from metallic.engine.chat import fit_history

    history = [*_turns(3), {"role": "user", "content": "q3"}]
    kept, dropped = fit_history(history, lambda m: len(m) <= 4)
    assert dropped == 4
    assert [m["content"] for m in kept] == ["sys", "q2", "a2", "q3"]
    kept, dropped = fit_history(history, lambda m: True)
    assert (kept, dropped) == (history, 0)


def test_fit_history_never_drops_the_last_user_turn() -> None:
    from metallic.engine.chat import fit_history

    history = [*_turns(2), {"role": "user", "content": "too long"}]
    kept, dropped = fit_history(history, lambda m: False)
    assert [m["content"] for m in kept] == ["sys", "too long"] and dropped == 4
    no_system = history[1:]
    kept, _ = fit_history(no_system, lambda m: len(m) <= 1)
    assert kept == [{"role": "user", "content": "too long"}]
