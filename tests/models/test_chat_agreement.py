"""`metallic chat`'s default model against HF transformers (issue 15).

tests/fixtures/hf_chat_smollm2_135m.json holds HF transformers' float32 greedy replies to a few
conversations on the same SmolLM2-135M-Instruct file (scripts/make_hf_chat_fixtures.py): the
prompt ids of its own template rendering and tokenizer, the reply ids, and the top two logits at
every reply position. metallic must build the same prompt and give the same reply; a different
token is allowed only where HF's top two logits are within NEAR_TIE (float rounding may then
pick either), and the comparison ends there, since the texts go separate ways after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metallic.engine.chat import ChatTemplate
from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf_chat_smollm2_135m.json"
NEAR_TIE = 0.01
REFERENCE = json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm2(chat_model_path: Path) -> Engine:
    # f32 weights: the same dequantized values HF computes with (the CPU default stores f16)
    return Engine(chat_model_path, device="cpu", dtype="f32", context_size=512)


def test_fixture_covers_several_conversations() -> None:
    cases = REFERENCE["cases"]
    assert len(cases) >= 4 and any(len(case["messages"]) > 2 for case in cases)
    assert any(case["messages"][0]["role"] == "system" for case in cases)
    assert all(len(case["top2_logits"]) == len(case["reply_ids"]) for case in cases)


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["messages"][-1]["content"])
def test_greedy_chat_reply_matches_hf(smollm2: Engine, case: dict) -> None:
    template = ChatTemplate.for_model(smollm2.gguf.metadata)
    prompt = template.render(case["messages"])
    ids = smollm2.tokenizer.encode(prompt, add_special=True, parse_special=True)
    assert ids == case["prompt_ids"]

    expected = case["reply_ids"]
    params = SamplingParams(temperature=0.0, max_tokens=REFERENCE["max_tokens"])
    got = [step.token_id for step in smollm2.generate_tokens(ids, params)]
    assert set(smollm2.tokenizer.stop_ids) == set(REFERENCE["stop_ids"])
    differ = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if differ is None:
        assert got == expected  # same tokens, and both stopped at the same place
        return
    (first, top), (second, runner_up) = case["top2_logits"][differ]
    assert first == expected[differ]
    assert top - runner_up < NEAR_TIE, (
        f"reply differs at token {differ}: metallic {got[differ]}, HF {expected[differ]} "
        f"with a logit margin of {top - runner_up:.4f} over {second}"
    )
    assert got[differ] == second  # the near-tie's other side, not some third token
