"""The OpenAI API as a client sees it, on the default model (Gemma 3 270M; a base model, whose
chat goes through the built-in Gemma template): completions and chat, streamed and not, logprobs,
several choices, and many clients at once."""

from __future__ import annotations

import asyncio

import openai
import pytest

PROMPT = "The three most common colors of cars are"
CHAT = [{"role": "user", "content": "Name three colors."}]


def test_models_lists_the_served_model(gemma) -> None:
    models = gemma.client().models.list()
    assert [m.id for m in models.data] == ["gemma"]
    assert gemma.client().models.retrieve("gemma").id == "gemma"


def test_completion_streamed_equals_plain(gemma) -> None:
    client = gemma.client()
    args = {"model": "gemma", "prompt": PROMPT, "max_tokens": 10, "seed": 3, "temperature": 0.9}
    plain = client.completions.create(**args)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert plain.usage.completion_tokens <= 10
    assert plain.usage.prompt_tokens == len(gemma.engine.tokenizer.encode(PROMPT))
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == choice.finish_reason and not any(reasons[:-1])
    assert all(c.usage is None for c in chunks)

    with_usage = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    last = with_usage[-1]
    assert last.choices == [] and last.usage.model_dump() == plain.usage.model_dump()
    assert "".join(c.choices[0].text for c in with_usage[:-1]) == choice.text


def test_chat_streamed_equals_plain(gemma) -> None:
    client = gemma.client()
    args = {"model": "gemma", "messages": CHAT, "max_tokens": 10, "seed": 5}
    plain = client.chat.completions.create(**args)
    message = plain.choices[0].message
    assert message.role == "assistant" and message.content
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")

    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    body, usage = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].delta.content or "" for c in body) == message.content
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == plain.choices[0].finish_reason and not any(reasons[:-1])
    assert usage.choices == [] and usage.usage.model_dump() == plain.usage.model_dump()


def test_completion_logprobs_off_zero_five(gemma) -> None:
    client = gemma.client()
    args = {"model": "gemma", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    assert client.completions.create(**args).choices[0].logprobs is None
    for k in (0, 5):
        choice = client.completions.create(**args, logprobs=k).choices[0]
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        assert "".join(lp.tokens) == choice.text
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert len(top) == max(k, 1)  # greedy: the chosen token is the most likely
            assert top[token] == logprob == max(top.values()) and logprob <= 0


def test_chat_logprobs_off_zero_five(gemma) -> None:
    client = gemma.client()
    args = {"model": "gemma", "messages": CHAT, "max_tokens": 4, "temperature": 0}
    assert client.chat.completions.create(**args).choices[0].logprobs is None
    for k in (0, 5):
        reply = client.chat.completions.create(**args, logprobs=True, top_logprobs=k)
        content = reply.choices[0].logprobs.content
        assert len(content) == reply.usage.completion_tokens
        for entry in content:
            assert len(entry.top_logprobs) == k
            assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
            if k:
                assert entry.top_logprobs[0].token == entry.token
                assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
                values = [t.logprob for t in entry.top_logprobs]
                assert values == sorted(values, reverse=True)


def test_logprobs_above_the_limit_are_a_400_and_the_server_goes_on(gemma) -> None:
    client = gemma.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="gemma", prompt=PROMPT, max_tokens=2, logprobs=21)
    assert err.value.status_code == 400 and err.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="gemma", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=21
        )
    assert err.value.body["param"] == "top_logprobs"
    reply = client.completions.create(model="gemma", prompt=PROMPT, max_tokens=2, logprobs=20)
    assert len(reply.choices[0].logprobs.top_logprobs[0]) >= 20


def test_n_gives_indexed_choices_interleaved_when_streamed(gemma) -> None:
    client = gemma.client()
    args = {"model": "gemma", "prompt": PROMPT, "max_tokens": 6, "n": 3, "seed": 11}
    args |= {"extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**args)
    assert sorted(c.index for c in plain.choices) == [0, 1, 2]
    texts = {c.index: c.text for c in plain.choices}
    assert len(set(texts.values())) > 1  # seeds one apart: the choices differ
    assert plain.usage.completion_tokens == 18

    order, streamed = [], {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            order.append(choice.index)
            streamed[choice.index] += choice.text
    assert streamed == texts  # and the seeds make them reproducible
    assert order != sorted(order)  # interleaved, not one choice after another
    assert all(order.count(i) >= 2 for i in range(3))


async def _stream_all(server, n: int, max_tokens: int) -> list[tuple[str, str]]:
    """`n` concurrent streaming completions: each one's text and finish reason."""
    client = server.async_client()

    async def one(i: int) -> tuple[str, str]:
        stream = await client.completions.create(
            model="gemma",
            prompt=f"Story number {i}: once upon a time",
            max_tokens=max_tokens,
            stream=True,
        )
        text, reason = "", ""
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def test_32_concurrent_streaming_clients_all_complete(gemma) -> None:
    results = asyncio.run(_stream_all(gemma, 32, 4))
    assert len(results) == 32
    assert all(reason in ("stop", "length") for _, reason in results)
    assert sum(1 for text, _ in results if text) >= 30


async def _generated(server, prompts: list[str], together: bool) -> int:
    client = server.async_client()
    extra = {"ignore_eos": True}

    async def one(prompt: str) -> int:
        reply = await client.completions.create(
            model="gemma", prompt=prompt, max_tokens=16, temperature=0, extra_body=extra
        )
        return reply.usage.completion_tokens

    try:
        if together:
            return sum(await asyncio.gather(*(one(p) for p in prompts)))
        return sum([await one(p) for p in prompts])
    finally:
        await client.close()


def test_8_concurrent_requests_are_batched_into_few_steps(gemma) -> None:
    """Batching that works: the same 8 requests sent together take a fraction of the engine
    steps they take one after another (each step runs every sequence that is ready), with as
    many tokens. Counting steps, not seconds, keeps the test independent of a shared CPU's
    speed; the gain in tokens per second is benchmarks/serve.py's to measure."""
    prompts = [f"Item {i} on the list of things to do today is" for i in range(8)]
    steps = {}
    for together in (False, True):
        before = gemma.engine.call(_steps)
        assert asyncio.run(_generated(gemma, prompts, together)) == 8 * 16
        steps[together] = gemma.engine.call(_steps) - before
    # One after another: at least a step per generated token (128); together, the prompts and
    # decodes of all 8 share steps.
    assert steps[False] >= 8 * 16
    assert steps[True] * 3 <= steps[False], steps


def _steps(engine) -> int:
    return engine.runner.steps
