"""Where each layer's weights live, within a device memory budget, and how that changes.

A plan puts every non-layer weight (output, norms, and the embedding unless the loader reads it
from host memory) on the device and each layer either on the device or on the host, streamed one
layer ahead (`runtime.streaming`). `--gpu-layers N` keeps the first N layers; `--gpu-memory
BYTES` keeps as many as fit beside the streaming slots, the reserve and a minimal KV cache. The
reserve is a list of named parts (the CUDA context, a step's activations, ...), so that `-v` and
the minimum-budget error can say how the budget is split. Weights come first: the KV cache starts
with what is left and grows on demand, and when it would pass the budget the residency policy
moves the coldest layers to the host (and back when the demand falls).

Every layer is read once per step, so none is colder by use: the coldest are the last layers,
the order in which llama.cpp's --n-gpu-layers leaves layers on the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from metallic.errors import MetallicError

MiB = 1 << 20

Parts = tuple[tuple[str, int], ...]  # (what, bytes)


class BudgetTooSmall(MetallicError):
    """The device budget cannot hold the minimum the model needs."""


def parse_bytes(text: str) -> int:
    """'2G', '1500M', '512MiB', '3e9' -> bytes (binary units: 1G = 1024**3)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[: len(value) - len(suffix)])
    except ValueError:
        raise MetallicError(f"cannot read {text!r} as a size (examples: 2G, 1500M)") from None
    n_bytes = number * units[suffix]
    if not math.isfinite(n_bytes) or n_bytes < 1:
        raise MetallicError(f"a memory size must be a positive finite number, got {text!r}")
    return int(n_bytes)


def stream_slot_bytes(host_layer_bytes: list[int]) -> int:
    """Device bytes of the streaming slots for these host layers (two, double-buffered)."""
    return min(2, len(host_layer_bytes)) * max(host_layer_bytes, default=0)


def device_weight_bytes(layer_bytes: Sequence[int], fixed_bytes: int, host: set[int]) -> int:
    """Device bytes of weights with the `host` layers streamed: the non-layer weights, the
    resident layers and the streaming slots."""
    resident = sum(b for i, b in enumerate(layer_bytes) if i not in host)
    return fixed_bytes + resident + stream_slot_bytes([layer_bytes[i] for i in host])


def _mib(parts: Parts) -> str:
    return ", ".join(f"{what} {n / MiB:.0f}" for what, n in parts)


@dataclass(frozen=True)
class MemoryPlan:
    on_device: tuple[bool, ...]  # per layer
    layer_bytes: tuple[int, ...]
    fixed_bytes: int  # non-layer weights on the device: output, norms (and the embedding)
    kv_bytes: int  # the KV cache's starting size
    reserve: Parts  # what the budget holds beside weights and KV cache, by name
    budget: int | None
    host_fixed_bytes: int = 0  # non-layer weights read from host memory (the embedding)

    @property
    def reserve_bytes(self) -> int:
        return sum(n for _, n in self.reserve)

    @property
    def host_layers(self) -> list[int]:
        return [i for i, here in enumerate(self.on_device) if not here]

    @property
    def weight_bytes(self) -> int:
        """Device bytes of weights: fixed, resident layers and the streaming slots."""
        return device_weight_bytes(self.layer_bytes, self.fixed_bytes, set(self.host_layers))

    def weight_parts(self) -> Parts:
        """What `weight_bytes` is made of (parts of 0 bytes left out)."""
        host = [self.layer_bytes[i] for i in self.host_layers]
        parts = (
            ("non-layer", self.fixed_bytes),
            ("resident layers", sum(self.layer_bytes) - sum(host)),
            ("streaming slots", stream_slot_bytes(host)),
        )
        return tuple(p for p in parts if p[1])

    def describe(self) -> str:
        n = len(self.on_device)
        text = f"{n - len(self.host_layers)}/{n} layers on the device"
        if self.host_layers:
            text += f", {len(self.host_layers)} streamed from the host"
        if self.host_fixed_bytes:
            text += (
                f"; the embedding ({self.host_fixed_bytes / MiB:.0f} MiB) is read from host memory"
            )
        if self.budget is not None:
            used = self.weight_bytes + self.kv_bytes + self.reserve_bytes
            text += (
                f" ({used / MiB:.0f} of {self.budget / MiB:.0f} MiB budget: weights"
                f" {self.weight_bytes / MiB:.0f} ({_mib(self.weight_parts())}), KV cache"
                f" {self.kv_bytes / MiB:.0f}, {_mib(self.reserve)})"
            )
        return text


def plan_memory(
    layer_bytes: list[int],
    fixed_bytes: int,
    kv_bytes: int,
    min_kv_bytes: int,
    reserve: int | Parts,
    *,
    budget: int | None = None,
    gpu_layers: int | None = None,
    host_fixed_bytes: int = 0,
) -> MemoryPlan:
    """Choose the resident layers. Without a budget the KV cache gets its full size; with one,
    the KV cache gets what the weights and the `reserve` (bytes, or named parts) leave (at
    least `min_kv_bytes`, at most `kv_bytes`). `host_fixed_bytes`: non-layer weights kept in
    host memory, outside the budget (for the record)."""
    n = len(layer_bytes)
    if gpu_layers is not None and gpu_layers < 0:
        raise MetallicError(f"--gpu-layers must be 0 or more, got {gpu_layers}")
    parts = (("reserve", reserve),) if isinstance(reserve, int) else tuple(reserve)
    reserve_bytes = sum(b for _, b in parts)

    def plan(resident: int, kv: int) -> MemoryPlan:
        on_device = tuple(i < resident for i in range(n))
        return MemoryPlan(
            on_device, tuple(layer_bytes), fixed_bytes, kv, parts, budget, host_fixed_bytes
        )

    if budget is None:
        return plan(n if gpu_layers is None else min(gpu_layers, n), kv_bytes)
    most = n if gpu_layers is None else min(gpu_layers, n)
    for resident in range(most, -1, -1):
        candidate = plan(resident, 0)
        left = budget - candidate.weight_bytes - reserve_bytes
        if left >= min_kv_bytes:
            return plan(resident, min(kv_bytes, left))
        if gpu_layers is not None:
            break
    least = plan(0 if gpu_layers is None else most, 0)
    needed = least.weight_bytes + reserve_bytes + min_kv_bytes
    rest = (("a minimal KV cache", min_kv_bytes), *parts)
    raise BudgetTooSmall(
        f"a device budget of {budget / MiB:.0f} MiB is too small: this model needs at least "
        f"{needed / MiB:.0f} MiB"
        + (f" with {most} layers on the device" if gpu_layers is not None else "")
        + f" (MiB: weights {_mib(least.weight_parts())}; {_mib(rest)})"
    )


class KVBudgetExceeded(MetallicError):
    """The KV cache needs more than the budget can give, with every layer already streamed."""


class ResidencyPolicy:
    """Decides which layers leave the device when the KV cache must grow, and which return when
    it shrinks; the engine carries the moves out and reports them."""

    def __init__(self, plan: MemoryPlan) -> None:
        if plan.budget is None:
            raise ValueError("a residency policy needs a budget")
        self.plan = plan
        self.budget = plan.budget
        self.host = set(plan.host_layers)
        self.evictions = 0
        self.restores = 0

    def _kv_room(self, host: set[int]) -> int:
        """What the budget leaves the KV cache with the `host` layers streamed."""
        weights = device_weight_bytes(self.plan.layer_bytes, self.plan.fixed_bytes, host)
        return self.budget - weights - self.plan.reserve_bytes

    def make_room(self, kv_bytes: int, extra: int) -> list[int]:
        """Layers to move to the host (coldest first) so the KV cache can grow from `kv_bytes`
        by `extra`; raises KVBudgetExceeded when even streaming every layer is not enough."""
        need = kv_bytes + extra
        host = set(self.host)
        moved: list[int] = []
        for layer in sorted(set(range(len(self.plan.layer_bytes))) - host, reverse=True):
            if self._kv_room(host) >= need:
                break
            host.add(layer)
            moved.append(layer)
        if self._kv_room(host) < need:
            raise KVBudgetExceeded(
                f"the KV cache needs {need / MiB:.0f} MiB but a device budget of "
                f"{self.budget / MiB:.0f} MiB leaves it at most {self._kv_room(host) / MiB:.0f}"
                " MiB (raise --gpu-memory or lower --ctx-size)"
            )
        self.host = host
        self.evictions += len(moved)
        return moved

    def kv_room_all_streamed(self) -> int:
        """The most the budget can ever leave the KV cache: with every layer streamed."""
        return self._kv_room(set(range(len(self.plan.layer_bytes))))

    def restorable(self, kv_bytes: int) -> list[int]:
        """Layers moved out earlier that fit back now that the KV cache holds `kv_bytes`
        (the warmest first), never past the plan made at load."""
        back: list[int] = []
        for layer in sorted(self.host - set(self.plan.host_layers)):
            if self._kv_room(self.host - {layer}) < kv_bytes:
                break
            self.host.discard(layer)
            back.append(layer)
        self.restores += len(back)
        return back
