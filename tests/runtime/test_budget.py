"""The device budget's share outside torch's allocator, with the CUDA queries mocked (CPU CI)."""

from __future__ import annotations

import logging

import pytest
import torch

import metallic.engine.loader as loader_module
from metallic.engine.engine import Engine
from metallic.runtime import budget
from metallic.runtime.placement import BudgetTooSmall, MiB
from metallic.testing.synthetic import write_synthetic_model

CUDA = torch.device("cuda", 0)
TOTAL = 80 << 30


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A fake CUDA device: 600 MiB in use, 100 MiB of it reserved by torch's allocator."""
    state = {"used": 600 * MiB, "reserved": 100 * MiB, "started": 0}

    def start(device: torch.device) -> None:
        state["started"] += 1

    monkeypatch.setattr(budget, "start_libraries", start)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (TOTAL - state["used"], TOTAL))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: state["reserved"])
    return state


def test_outside_share_is_device_use_less_torch_reserved(device: dict[str, int]) -> None:
    assert budget.held_outside_torch(CUDA) == 500 * MiB
    assert device["started"] == 1  # measured after CUDA and cuBLAS started


def test_overhead_is_the_measured_share_and_the_kernel_allowance(
    device: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="metallic"):
        overhead = budget.budget_overhead(CUDA, 2048 * MiB)
    assert overhead == (
        ("CUDA context and libraries", 500 * MiB),
        ("kernel modules", budget.KERNEL_MODULE_BYTES),
    )
    assert (
        "device budget: 2048 MiB, of which the CUDA context and libraries hold 500 MiB"
        in caplog.text
    )


def test_nothing_is_measured_without_a_budget_or_on_the_cpu(device: dict[str, int]) -> None:
    assert budget.budget_overhead(CUDA, None) == ()
    assert budget.budget_overhead(torch.device("cpu"), 2048 * MiB) == ()
    assert device["started"] == 0


def test_torch_is_capped_at_its_share_of_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is a fraction of the device's memory: torch's allocator may reserve no more."""
    fractions = []

    class Properties:
        total_memory = TOTAL

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Properties)
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d: fractions.append((f, d))
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    budget.cap_torch(CUDA, 1267 * MiB)
    budget.cap_torch(torch.device("cuda"), 1267 * MiB)  # no index: the current device's
    budget.cap_torch(torch.device("cpu"), 1267 * MiB)  # no allocator to cap
    assert fractions == [(1267 * MiB / TOTAL, 0)] * 2


@pytest.mark.parametrize("budget_mib", [100, 500, 500 + budget.KERNEL_MODULE_BYTES // MiB])
def test_budget_the_context_fills_is_the_one_line_minimum_error(
    device: dict[str, int], budget_mib: int
) -> None:
    with pytest.raises(BudgetTooSmall) as err:
        budget.budget_overhead(CUDA, budget_mib * MiB)
    message = str(err.value)
    assert message.startswith(f"a device budget of {budget_mib} MiB is too small")
    assert "the CUDA context and libraries alone hold 500 MiB" in message and "\n" not in message


def test_engine_plans_within_what_the_overhead_leaves(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine adds the share to the plan's reserve: every plan figure and minimum counts it."""
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q8_0")
    roomy = Engine(path, device="cpu", memory_budget=1 << 40).plan
    assert roomy is not None
    calls = []

    def overhead(device: torch.device, budget_bytes: int | None) -> tuple[tuple[str, int], ...]:
        calls.append(budget_bytes)
        return (("CUDA context and libraries", 300 * MiB),)

    monkeypatch.setattr(loader_module, "budget_overhead", overhead)
    plan = Engine(path, device="cpu", memory_budget=1 << 40).plan
    assert plan is not None and calls == [1 << 40]
    assert plan.reserve_bytes == roomy.reserve_bytes + 300 * MiB
    assert plan.reserve[0] == ("CUDA context and libraries", 300 * MiB)
    too_small = roomy.weight_bytes + roomy.reserve_bytes + 200 * MiB
    with pytest.raises(BudgetTooSmall, match="CUDA context and libraries 300,") as err:
        Engine(path, device="cpu", memory_budget=too_small)
    assert "\n" not in str(err.value)
