"""Chat prompts: the GGUF file's own Jinja template when it has one, a built-in one otherwise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from metallic.errors import MetallicError

Message = Mapping[str, str]

# Built-in templates for files without `tokenizer.chat_template`, by model family.
# Whitespace that matters is written as string literals, so Jinja's block trimming cannot eat it.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] ~ '\\n\\n' if messages and "
    "messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else 'user') ~ '\\n' }}"
    "{{ (system if loop.first else '') ~ (m['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' }}"
    "{{ (m['content'] | trim) ~ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"gemma3": GEMMA_TEMPLATE, "qwen2": CHATML_TEMPLATE, "qwen3": CHATML_TEMPLATE}


def builtin_template(arch: str, tokens: Sequence[str]) -> str:
    """The family's template; llama files use Llama 3's when they carry its header tokens."""
    if arch == "llama":
        return LLAMA3_TEMPLATE if "<|start_header_id|>" in tokens else CHATML_TEMPLATE
    return BUILTIN_TEMPLATES.get(arch, CHATML_TEMPLATE)


def _raise(message: str) -> None:
    raise MetallicError(f"chat template: {message}")


class ChatTemplate:
    """Renders a conversation into the prompt text the model was trained on."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise MetallicError(f"chat template does not parse: {err}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_model(cls, metadata: Mapping[str, Any]) -> ChatTemplate:
        tokens = metadata.get("tokenizer.ggml.tokens") or []

        def token(key: str) -> str:
            index = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            source = builtin_template(str(metadata.get("general.architecture")), tokens)
        return cls(source, token("bos"), token("eos"))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as err:
            raise MetallicError(f"chat template failed to render: {err}") from None
