"""The memory planner and the residency policy: pure bookkeeping, checked on hand-made sizes."""

from __future__ import annotations

import pytest

from metallic.errors import MetallicError
from metallic.runtime.placement import (
    BudgetTooSmall,
    KVBudgetExceeded,
    MiB,
    ResidencyPolicy,
    parse_bytes,
    plan_memory,
    stream_slot_bytes,
)

LAYERS = [100] * 8  # bytes per layer
FIXED, KV, LEAST_KV, RESERVE = 50, 400, 40, 10


def plan(**kwargs):
    return plan_memory(LAYERS, FIXED, KV, LEAST_KV, RESERVE, **kwargs)


def test_parse_bytes() -> None:
    assert parse_bytes("2G") == 2 << 30
    assert parse_bytes("1500M") == 1500 << 20
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("4096") == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(MetallicError):
            parse_bytes(bad)


def test_no_budget_keeps_everything_or_the_first_layers() -> None:
    assert plan().host_layers == [] and plan().kv_bytes == KV
    p = plan(gpu_layers=3)
    assert p.on_device == (True,) * 3 + (False,) * 5
    assert p.weight_bytes == FIXED + 3 * 100 + 200  # and two slots of the largest host layer
    assert plan(gpu_layers=99).host_layers == []
    with pytest.raises(MetallicError, match="0 or more"):
        plan(gpu_layers=-1)


def test_budget_that_fits_everything_gives_the_kv_cache_the_rest() -> None:
    p = plan(budget=FIXED + 800 + RESERVE + 100)
    assert p.host_layers == [] and p.kv_bytes == 100  # grows later, within the budget
    assert plan(budget=10_000).kv_bytes == KV  # never more than the full context needs


def test_budget_streams_the_last_layers_and_counts_the_slots() -> None:
    budget = 600
    p = plan(budget=budget)
    # weights = 50 + 100 * resident + 200 (slots) ; + reserve 10 + least KV 40 <= 600
    assert p.on_device == (True,) * 3 + (False,) * 5
    assert p.weight_bytes + p.reserve_bytes + p.kv_bytes <= budget
    assert p.kv_bytes >= LEAST_KV
    assert "3/8 layers on the device, 5 streamed" in p.describe()


def test_budget_too_small_names_the_minimum() -> None:
    minimum = FIXED + 200 + RESERVE + LEAST_KV  # nothing resident, two slots
    assert plan(budget=minimum).on_device == (False,) * 8
    with pytest.raises(BudgetTooSmall, match=f"at least {minimum / 2**20:.0f} MiB"):
        plan(budget=minimum - 1)
    with pytest.raises(BudgetTooSmall, match="with 6 layers on the device"):
        plan(budget=500, gpu_layers=6)


def test_stream_slots() -> None:
    assert stream_slot_bytes([]) == 0
    assert stream_slot_bytes([70]) == 70
    assert stream_slot_bytes([70, 90, 80]) == 180


def test_residency_moves_the_coldest_layers_and_brings_them_back() -> None:
    p = plan(budget=FIXED + 800 + RESERVE + 100)
    policy = ResidencyPolicy(p)
    assert policy.make_room(kv_bytes=100, extra=0) == []
    # Growing the KV cache by 250: streaming 1 or 2 layers frees nothing (their slots cost as
    # much), the third frees 100, so five layers must go.
    moved = policy.make_room(kv_bytes=100, extra=250)
    assert moved == [7, 6, 5, 4, 3]
    assert policy.make_room(kv_bytes=350, extra=0) == []  # the grown cache now fits
    assert policy.evictions == 5
    assert policy.restorable(kv_bytes=350) == []  # still needed
    assert policy.restorable(kv_bytes=100) == [3, 4, 5, 6, 7]
    assert policy.restores == 5 and policy.host == set()


def test_residency_never_restores_past_the_plan_and_fails_clearly() -> None:
    p = plan(budget=600)
    policy = ResidencyPolicy(p)
    assert policy.restorable(kv_bytes=0) == []  # planned host layers stay streamed
    with pytest.raises(KVBudgetExceeded, match="raise --gpu-memory or lower --ctx-size"):
        policy.make_room(kv_bytes=p.kv_bytes, extra=10_000)
    assert policy.host == set(p.host_layers)  # a refused request moves nothing


def test_named_reserve_parts_are_the_split_that_describe_and_the_error_give() -> None:
    """A reserve of named parts counts as their sum; `describe` (what -v logs) and the
    minimum-budget error list every part, on one line. Non-layer weights kept in host memory
    are outside the device's weights."""
    reserve = (("CUDA context and libraries", 6 * MiB), ("activations", 3 * MiB))
    layers, fixed, least = [10 * MiB] * 4, 4 * MiB, 1 * MiB

    def budget_plan(budget: int):
        return plan_memory(
            layers, fixed, 8 * MiB, least, reserve, budget=budget, host_fixed_bytes=2 * MiB
        )

    p = budget_plan(60 * MiB)
    assert p.reserve_bytes == 9 * MiB and p.weight_bytes == fixed + 40 * MiB  # all resident
    assert p.weight_bytes + p.kv_bytes + p.reserve_bytes <= 60 * MiB
    text = p.describe()
    assert "the embedding (2 MiB) is read from host memory" in text
    assert "weights 44 (non-layer 4, resident layers 40)" in text
    assert "CUDA context and libraries 6, activations 3)" in text
    minimum = fixed + 2 * 10 * MiB + least + 9 * MiB  # every layer streamed: two slots
    assert budget_plan(minimum).host_layers == [0, 1, 2, 3]
    with pytest.raises(BudgetTooSmall) as err:
        budget_plan(minimum - 1)
    assert str(err.value) == (
        f"a device budget of {(minimum - 1) / MiB:.0f} MiB is too small: this model needs at "
        "least 34 MiB (MiB: weights non-layer 4, streaming slots 20; a minimal KV cache 1, CUDA "
        "context and libraries 6, activations 3)"
    )
