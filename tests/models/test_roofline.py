"""The roofline's counts against independent ones: the file's tensor sizes, brute-force
attention pairs, and the products' shapes."""

from __future__ import annotations

import itertools

import pytest
from gguf import GGMLQuantizationType as T

from metallic.engine.engine import Engine
from metallic.gguf.reader import open_gguf
from metallic.models.roofline import Cost, Limits, Roofline, matrix_bytes, visible_pairs
from metallic.ops.linear import LinearWeight
from metallic.runtime.profiler import StepShape
from metallic.testing.synthetic import write_synthetic_model


@pytest.mark.parametrize(
    ("start", "end", "window"), list(itertools.product([0, 3, 17], [20, 41], [0, 1, 8, 64]))
)
def test_visible_pairs_counts_every_causal_pair(start: int, end: int, window: int) -> None:
    brute = sum(
        1
        for query in range(start, end)
        for key in range(query + 1)
        if not window or query - key < window
    )
    assert visible_pairs(start, end, window) == brute


def test_native_matrix_bytes_are_the_files_tensor_bytes(tmp_path) -> None:
    """q|k|v of a Q4_K_M file (mixed formats per part) counted from the block table equal the
    bytes the file stores for them."""
    path = write_synthetic_model(tmp_path / "m.gguf", "tiny-llama", "Q4_K_M", fill="sparse")
    gguf = open_gguf(path)
    infos = [gguf.tensor(f"blk.0.attn_{part}.weight") for part in "qkv"]
    weight = LinearWeight(
        ggml_types=tuple(T(i.ggml_type) for i in infos),
        part_rows=tuple(i.shape[0] for i in infos),
        in_features=infos[0].shape[1],
        native=(),
    )
    assert matrix_bytes(weight) == sum(i.n_bytes for i in infos)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = write_synthetic_model(tmp_path_factory.mktemp("m") / "gemma.gguf", "tiny-gemma3")
    return Engine(path, device="cpu", dtype="f32", context_size=256)


def test_decode_costs(engine: Engine) -> None:
    """One sequence decoding its 41st token: products read their dense f32 matrices once and
    make 2 FLOPs per weight; attention reads every position's keys and values (the local
    layers those of their window) and pairs the query with each."""
    c = engine.config
    costs = Roofline(engine.model).costs(StepShape(((40, 1),), 1))
    kv_row = 2 * c.kv_size * 4
    for i, layer in enumerate(engine.model.weights.layers):
        qkv = costs["qkv", i]
        assert qkv.flops == 2 * c.hidden_size * (c.q_size + 2 * c.kv_size)
        assert qkv.bytes == layer.qkv.dense.numel() * 4 + 4 * (
            c.hidden_size + qkv.flops / 2 / c.hidden_size
        )
        keys = min(41, c.sliding_window) if c.is_sliding(i) else 41
        attention = costs["attention", i]
        assert attention.flops == 4 * c.n_heads * c.head_dim * keys
        assert attention.bytes == (keys + 1) * kv_row + 2 * c.q_size * 4
    assert costs["output", -1].flops == 2 * c.hidden_size * c.vocab_size
    assert {kind for kind, _ in costs} >= {"embed", "attn_norm", "gate_up", "down", "output"}


def test_prefill_counts_each_token(engine: Engine) -> None:
    roofline = Roofline(engine.model)
    one = roofline.costs(StepShape(((0, 1),), 1))
    many = roofline.costs(StepShape(((0, 32),), 1))
    c = engine.config
    assert many["gate_up", 0].flops == 32 * one["gate_up", 0].flops
    assert many["output", -1] == one["output", -1]  # logits of the last token only
    window = c.sliding_window if c.is_sliding(0) else 0
    pairs = visible_pairs(0, 32, window)
    assert many["attention", 0].flops == 4 * c.n_heads * c.head_dim * pairs


def test_limits_pick_the_binding_roof() -> None:
    limits = Limits(bandwidth=1e12, flops=100e12)
    memory_bound = Cost(bytes=1e9, flops=2e9)  # 1 ms of bytes, 0.02 ms of FLOPs
    compute_bound = Cost(bytes=1e6, flops=1e12)  # 10 ms of FLOPs
    assert limits.floor_seconds(memory_bound) == pytest.approx(1e-3)
    assert limits.bound(memory_bound) == "memory"
    assert limits.floor_seconds(compute_bound) == pytest.approx(1e-2)
    assert limits.bound(compute_bound) == "compute"
