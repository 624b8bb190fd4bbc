"""The engine's behaviour on a tiny synthetic model: streaming, stops, seeds, limits, errors."""

from __future__ import annotations

import pytest

import metallic
from metallic.engine.engine import Engine, PromptTooLong
from metallic.engine.sampling import SamplingError, SamplingParams
from metallic.errors import MetallicError
from metallic.testing.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = write_synthetic_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny-llama", "Q8_0")
    return metallic.load(path, device="cpu", context_size=64)


def test_stream_pieces_join_to_generate(engine: Engine) -> None:
    pieces = list(engine.stream("hello world", max_tokens=12, temperature=0))
    assert "".join(pieces) == engine.generate("hello world", max_tokens=12, temperature=0)
    assert engine.last_stats.generated_tokens <= 12


def test_same_seed_same_text(engine: Engine) -> None:
    a = engine.generate("abc", max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    b = engine.generate("abc", max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    c = engine.generate("abc", max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=8)
    assert a == b
    assert a != c


def test_max_tokens_and_ids(engine: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    steps = list(engine.generate_tokens("abc", params))
    assert len(steps) == 5
    assert engine.last_stats.finish_reason == "length"
    text = engine.tokenizer.decode([s.token_id for s in steps])
    assert "".join(s.text for s in steps) == text


def test_stop_string_cuts_text(engine: Engine) -> None:
    full = engine.generate("abc", max_tokens=20, temperature=0, ignore_eos=True)
    if len(full) < 4:
        pytest.skip("the tiny model produced too little text to cut")
    stop = full[2:4]
    cut = engine.generate("abc", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert engine.last_stats.finish_reason == "stop"


def test_context_limit_ends_generation(engine: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    prompt = engine.tokenizer.encode("abc")
    steps = list(engine.generate_tokens(prompt, params))
    assert len(prompt) + len(steps) <= engine.context_size
    assert engine.last_stats.finish_reason == "length"


def test_prompt_too_long(engine: Engine) -> None:
    long_prompt = list(range(3, 3 + 100))
    with pytest.raises(PromptTooLong, match="context holds 64"):
        engine.generate(long_prompt, max_tokens=4)
    steps = list(engine.generate_tokens(long_prompt, SamplingParams(max_tokens=2), truncate=True))
    assert 1 <= len(steps) <= 2


def test_blocks_go_back_after_every_request(engine: Engine) -> None:
    idle = [pool.n_free for pool in engine.blocks.pools]
    engine.generate("abc", max_tokens=3)
    with pytest.raises(SamplingError):
        engine.generate("abc", max_tokens=3, temperature=-1)
    assert [pool.n_free for pool in engine.blocks.pools] == idle
    assert not engine.has_unfinished()


def test_unknown_option(engine: Engine) -> None:
    with pytest.raises(MetallicError, match="unknown sampling option"):
        engine.generate("abc", max_tokens=3, temprature=0.5)


def test_token_ids_outside_the_vocabulary(engine: Engine) -> None:
    with pytest.raises(MetallicError, match="outside the vocabulary"):
        engine.generate([1, 99999], max_tokens=2)
    with pytest.raises(MetallicError, match="outside the vocabulary"):
        engine.logits([-1])


def test_stats_report_memory_and_the_last_run(engine: Engine) -> None:
    engine.generate("memory", max_tokens=3, temperature=0)
    stats = engine.stats()
    assert stats["weight_bytes"] == engine.model.weights.nbytes > 0
    assert stats["kv_cache_bytes"] == engine.store.nbytes > 0
    assert stats["last_run"]["generated_tokens"] == 3  # type: ignore[index]
