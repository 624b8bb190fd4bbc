"""Sampling: parameter validation, the filter chain, seeding, penalties and batching."""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import replace

import pytest
import torch

from metallic.engine.sampling import (
    Sampler,
    SamplingError,
    SamplingParams,
    apply_penalties,
    top_logprobs,
)

PURE = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}  # no filter: the plain softmax distribution


def sampled_set(logits: list[float], params: SamplingParams, draws: int = 400) -> set[int]:
    """Every token drawn from one fixed distribution by ``draws`` seeded sequences at once."""
    sampler = Sampler(len(logits))
    for seq in range(draws):
        sampler.add(seq, replace(params, seed=seq))
    tokens = sampler.sample(torch.tensor([logits] * draws), list(range(draws)))
    return set(tokens.tolist())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.1),
        ("repetition_penalty", math.inf),
        ("penalty_last_n", -1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("frequency_penalty", math.nan),
        ("seed", -1),
        ("seed", 1 << 64),
        ("seed", 1.5),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("stop", "\n"),
        ("stop", ("ok", "")),
        ("ignore_eos", 1),
    ],
)
def test_invalid_parameter_raises_one_line_error_naming_it(field: str, value: object) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(SamplingError) as caught:
        params.validate()
    message = str(caught.value)
    assert "\n" not in message
    assert field in message


def test_defaults_are_valid_and_match_llama_cpp() -> None:
    params = SamplingParams()
    params.validate()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.95, 0.05)
    assert (params.repetition_penalty, params.penalty_last_n) == (1.0, 64)


def test_sampler_add_rejects_invalid_params() -> None:
    with pytest.raises(SamplingError, match="top_p"):
        Sampler(8).add(0, SamplingParams(top_p=2.0))


def test_greedy_is_argmax_and_ignores_filters() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=generator)
    sampler = Sampler(1000)
    for seq in range(6):
        sampler.add(seq, SamplingParams(temperature=0.0, top_k=3, min_p=0.5, seed=seq))
    for _ in range(3):
        assert torch.equal(sampler.sample(logits, range(6)), logits.argmax(dim=1))


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(300)
    for seq in range(50):
        sampler.add(seq, SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0, seed=seq))
    assert torch.equal(sampler.sample(logits, range(50)), logits.argmax(dim=1))


def run_sequence(seed: int | None, steps: int = 40) -> list[int]:
    """Tokens one seeded sequence draws over a fixed stream of random logits."""
    logits = torch.randn(steps, 1, 500, generator=torch.Generator().manual_seed(7))
    sampler = Sampler(500)
    sampler.add(3, SamplingParams(temperature=1.5, seed=seed, **PURE))
    return [int(sampler.sample(step, [3])) for step in logits]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    assert run_sequence(1234) == run_sequence(1234)
    assert run_sequence(1234) != run_sequence(4321)
    assert run_sequence(None) != run_sequence(None)


def test_top_k_keeps_exactly_the_k_best() -> None:
    logits = [0.0, 3.0, 1.0, 2.9, 2.8, -1.0, 0.5, 2.7]
    params = SamplingParams(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0)
    assert sampled_set(logits, params) == {1, 3, 4, 7}


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    # probabilities 0.5, 0.25, 0.125, 0.0625 x2 (as logits of powers of two)
    logits = [math.log(p) for p in (0.0625, 0.5, 0.125, 0.25, 0.0625)]
    # 0.5 + 0.25 = 0.75 < 0.8, so token 2 (0.125) is needed to reach it; nothing more
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0)
    assert sampled_set(logits, params) == {1, 3, 2}
    # 0.5 alone is short of 0.7, 0.5 + 0.25 reaches it: token 2 is no longer needed
    assert sampled_set(logits, replace(params, top_p=0.7)) == {1, 3}


def test_min_p_keeps_tokens_at_least_min_p_times_the_best() -> None:
    logits = [math.log(p) for p in (0.4, 0.2, 0.1, 0.19, 0.05, 0.06)]
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)  # keep p >= 0.08
    assert sampled_set(logits, params) == {0, 1, 2, 3}


def test_filters_judge_probabilities_before_temperature() -> None:
    # min-p cuts at 0.2 * 0.4 = 0.08 of the T=1 probabilities; at T=20 all six would pass
    logits = [math.log(p) for p in (0.4, 0.2, 0.1, 0.19, 0.05, 0.06)]
    params = SamplingParams(temperature=20.0, top_k=0, top_p=1.0, min_p=0.2)
    assert sampled_set(logits, params, draws=600) == {0, 1, 2, 3}


def test_filters_chain_top_k_then_top_p() -> None:
    # top_k=3 leaves p ~ (0.53, 0.29, 0.18) renormalised, so top_p=0.75 keeps two tokens;
    # top_p on the full distribution (0.45, 0.25, 0.15, ...) would have kept three
    logits = [math.log(p) for p in (0.05, 0.25, 0.15, 0.1, 0.45)]
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.75, min_p=0.0)
    assert sampled_set(logits, params) == {4, 1}


# chi-square bounds at p = 0.001 by degrees of freedom
CHI_SQUARE_999 = {3: 16.27, 7: 24.32}


@pytest.mark.parametrize(
    ("filters", "allowed"),
    [
        (PURE, range(8)),  # no order needed: sampled in vocabulary order
        ({"top_k": 0, "top_p": 0.999999, "min_p": 0.0}, range(8)),  # top-p: full sort
        ({"top_k": 4, "top_p": 1.0, "min_p": 0.0}, [0, 3, 6, 7]),  # top-k candidates
    ],
)
def test_empirical_distribution_matches_softmax_with_temperature(
    filters: dict, allowed: list[int]
) -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5, 0.7])
    temperature, rows, steps = 0.7, 250, 40
    sampler = Sampler(8)
    for seq in range(rows):
        sampler.add(seq, SamplingParams(temperature=temperature, seed=seq + 99, **filters))
    batch = logits.expand(rows, 8)
    draws = torch.cat([sampler.sample(batch, range(rows)) for _ in range(steps)])
    observed = torch.bincount(draws, minlength=8).double()
    allowed = list(allowed)
    assert observed.sum() == observed[allowed].sum()
    expected = torch.softmax(logits[allowed].double() / temperature, 0) * draws.numel()
    chi_square = float(((observed[allowed] - expected) ** 2 / expected).sum())
    assert chi_square < CHI_SQUARE_999[len(allowed) - 1]


def test_penalties_follow_their_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.25, 1.0], [2.0, -1.0, 0.5, 3.0, -0.25, 1.0]])
    recent = torch.tensor([[0, 1, 0, 4, 0, -1, -1], [5, 5, 2, -1, -1, -1, -1]])
    out = apply_penalties(
        logits,
        recent,
        repetition_penalty=torch.tensor([1.25, 2.0]),
        presence_penalty=torch.tensor([0.5, 0.0]),
        frequency_penalty=torch.tensor([0.1, 0.3]),
    )
    expected = logits.clone()
    # row 0: token 0 seen 3x (positive), 1 once and 4 once (negative); r=1.25, p=0.5, f=0.1
    expected[0, 0] = 2.0 / 1.25 - 3 * 0.1 - 0.5
    expected[0, 1] = -1.0 * 1.25 - 0.1 - 0.5
    expected[0, 4] = -0.25 * 1.25 - 0.1 - 0.5
    # row 1: token 5 seen twice, 2 once; r=2, p=0, f=0.3; token 0 (padding's index) untouched
    expected[1, 5] = 1.0 / 2.0 - 2 * 0.3
    expected[1, 2] = 0.5 / 2.0 - 0.3
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits[1], torch.tensor([2.0, -1.0, 0.5, 3.0, -0.25, 1.0]))  # not in place


def test_sampler_penalises_its_own_recent_tokens_like_a_plain_reference() -> None:
    """Greedy decoding with penalties over a sliding window, checked against a direct loop."""
    vocab, window, steps = 12, 5, 60
    prompt = [3, 3, 7, 1, 3, 9]
    params = SamplingParams(
        temperature=0,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        penalty_last_n=window,
    )
    logits = torch.rand(steps, 1, vocab, generator=torch.Generator().manual_seed(3)) * 2 - 0.5
    sampler = Sampler(vocab)
    sampler.add(0, params, history=prompt)
    got = [int(sampler.sample(step, [0])) for step in logits]

    recent = deque(prompt, maxlen=window)
    expected = []
    for step in logits[:, 0].tolist():
        for token, count in Counter(recent).items():
            value = step[token]
            value = value / 1.3 if value > 0 else value * 1.3
            step[token] = value - count * 0.3 - 0.4
        expected.append(max(range(vocab), key=step.__getitem__))
        recent.append(expected[-1])
    assert got == expected
    assert len(set(got)) > 3  # the penalties did steer it away from a single winner


def test_history_argument_seeds_the_penalties() -> None:
    sampler = Sampler(4)
    sampler.add(0, SamplingParams(temperature=0, repetition_penalty=4.0), history=[1, 0])
    # token 0 (logit 2 -> 0.5) and token 1 (1.5 -> 0.375) penalised; token 2 (1.0) wins
    assert int(sampler.sample(torch.tensor([[2.0, 1.5, 1.0, 0.0]]), [0])) == 2


def test_ignore_eos_masks_end_of_generation_tokens() -> None:
    sampler = Sampler(4, eog_token_ids=[3])
    sampler.add(0, SamplingParams(temperature=0, ignore_eos=True))
    sampler.add(1, SamplingParams(temperature=0))
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0]] * 2)
    assert sampler.sample(logits, [0, 1]).tolist() == [1, 3]
    assert logits[0, 3] == 9.0  # the caller's logits are left as they were


def test_ignore_eos_in_place_masks_the_callers_logits_of_those_rows_only() -> None:
    sampler = Sampler(5, eog_token_ids=[3, 4])
    sampler.add(0, SamplingParams(temperature=0))
    sampler.add(1, SamplingParams(temperature=0, ignore_eos=True))
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0, 8.0]] * 2)
    assert sampler.sample(logits, [0, 1], in_place=True).tolist() == [3, 1]
    assert logits[0].tolist() == [0.0, 1.0, 0.5, 9.0, 8.0]
    assert logits[1].tolist() == [0.0, 1.0, 0.5, -math.inf, -math.inf]


def test_batch_rows_are_independent_of_their_batch_mates() -> None:
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(5))
    configs = [
        SamplingParams(temperature=0.9, seed=11),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=1.2, top_k=0, top_p=0.5, frequency_penalty=0.5, seed=12),
        SamplingParams(temperature=2.0, top_k=5, min_p=0.0, presence_penalty=1.0, seed=13),
    ]
    together = Sampler(200)
    for seq, params in enumerate(configs):
        together.add(seq, params)
    joint = [together.sample(logits, [0, 1, 2, 3]).tolist() for _ in range(10)]
    for seq, params in enumerate(configs):
        alone = Sampler(200)
        alone.add(seq, params)
        solo = [int(alone.sample(logits[seq : seq + 1], [seq])) for _ in range(10)]
        assert solo == [step[seq] for step in joint]


def test_batch_order_and_membership_may_change_between_steps() -> None:
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(8))
    sampler = Sampler(100)
    sampler.add(10, SamplingParams(seed=1, top_k=0, repetition_penalty=1.5))
    sampler.add(20, SamplingParams(seed=2, top_k=0, repetition_penalty=1.5))
    reference = Sampler(100)
    reference.add(20, SamplingParams(seed=2, top_k=0, repetition_penalty=1.5))
    first = sampler.sample(logits, [10, 20])
    second = sampler.sample(logits.flip(0), [20, 10])
    sampler.remove(10)
    sampler.add(30, SamplingParams(temperature=0))
    third = sampler.sample(logits, [30, 20])
    expected = [int(reference.sample(logits[1:], [20])) for _ in range(3)]
    assert [int(first[1]), int(second[0]), int(third[1])] == expected


def test_sampler_reports_misuse_as_sampling_errors() -> None:
    sampler = Sampler(10)
    sampler.add(0, SamplingParams())
    with pytest.raises(SamplingError, match="already"):
        sampler.add(0, SamplingParams())
    with pytest.raises(SamplingError, match="never added"):
        sampler.sample(torch.zeros(1, 10), [1])
    with pytest.raises(SamplingError, match="shape"):
        sampler.sample(torch.zeros(1, 11), [0])
    with pytest.raises(SamplingError, match="vocabulary"):
        Sampler(10).add(0, SamplingParams(repetition_penalty=1.1), history=[3, 10])


def test_top_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.5, 0.0, 0.0]])
    ids, logprobs = top_logprobs(logits, k=2)
    assert ids.tolist() == [[1, 2], [1, 0]]
    expected = torch.log_softmax(logits, dim=1).gather(1, ids)
    assert torch.allclose(logprobs, expected)
    assert top_logprobs(logits, k=10)[0].shape == (2, 4)
    with pytest.raises(SamplingError, match="k must be > 0"):
        top_logprobs(logits, k=0)
