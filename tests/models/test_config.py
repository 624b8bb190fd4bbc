import math
import re

import pytest

from metallic.errors import ConfigError
from metallic.gguf.config import config_from_metadata
from metallic.gguf.reader import open_gguf


def _llama_meta(**extra: object) -> dict:
    meta = {
        "general.architecture": "llama",
        "llama.context_length": 4096,
        "llama.embedding_length": 512,
        "llama.block_count": 4,
        "llama.feed_forward_length": 1024,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 500000.0,
        "tokenizer.ggml.tokens": ["a", "b", "c"],
    }
    meta.update(extra)
    return meta


def test_default_model_is_gemma3_with_its_quirks(default_model_path):
    cfg = config_from_metadata(open_gguf(default_model_path).metadata)
    assert cfg.arch == "gemma3"
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads) == (18, 640, 4, 1)
    assert cfg.head_dim == 256 and cfg.vocab_size == 262144
    # Five sliding layers, then a global one; the global layers use the file's rope base.
    assert [i for i in range(18) if not cfg.is_sliding(i)] == [5, 11, 17]
    assert cfg.layer_rope_base(0) == 10000.0 and cfg.layer_rope_base(5) == 1e6
    assert cfg.sliding_window == 512
    assert cfg.qk_norm and cfg.sandwich_norms and cfg.activation == "gelu_tanh"
    assert math.isclose(cfg.embed_scale, math.sqrt(640))
    assert cfg.softmax_scale == 1 / 16


def test_llama_defaults_and_gqa():
    cfg = config_from_metadata(_llama_meta())
    assert cfg.head_dim == 64 and cfg.rope_dim == 64 and not cfg.rope_neox
    assert cfg.vocab_size == 3 and cfg.n_kv_heads == 2
    assert not cfg.is_sliding(0) and cfg.activation == "silu"


@pytest.mark.parametrize(("arch", "flag"), [("qwen2", "qkv_bias"), ("qwen3", "qk_norm")])
def test_qwen_families(arch, flag):
    meta = {k.replace("llama.", f"{arch}."): v for k, v in _llama_meta().items()}
    meta["general.architecture"] = arch
    cfg = config_from_metadata(meta)
    assert cfg.rope_neox and getattr(cfg, flag)


def test_missing_key_is_named():
    meta = _llama_meta()
    del meta["llama.block_count"]
    with pytest.raises(ConfigError, match=r"model\.gguf: missing metadata key llama\.block_count"):
        config_from_metadata(meta, "model.gguf")


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown architecture 'mamba'"):
        config_from_metadata({"general.architecture": "mamba"}, "m.gguf")


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="must divide"):
        config_from_metadata(_llama_meta(**{"llama.attention.head_count_kv": 3}))
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        config_from_metadata(_llama_meta(**{"llama.block_count": "four"}))
    with pytest.raises(ConfigError, match=r"rope\.scaling\.type = 'yarn' is unsupported"):
        config_from_metadata(_llama_meta(**{"llama.rope.scaling.type": "yarn"}))


ROPE = "llama.rope.dimension_count"
KV_HEADS = "llama.attention.head_count_kv"
EPS = "llama.attention.layer_norm_rms_epsilon"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (ROPE, 1, f"{ROPE} = 1 must be an integer >= 2"),
        (ROPE, 63, f"{ROPE} = 63 must be even and <= head size 64"),
        (ROPE, 2**32 - 1, f"{ROPE} = 4294967295 must be even and <= head size 64"),
        (ROPE, 128, f"{ROPE} = 128 must be even and <= head size 64"),
        (
            "llama.attention.key_length",
            63,
            f"{ROPE} = 63 must be even and <= head size 63 (absent, so the head size)",
        ),
        ("llama.block_count", 2**31 - 1, "llama.block_count = 2147483647 must be at most 512"),
        ("llama.block_count", 0, "llama.block_count = 0 must be an integer >= 1"),
        ("llama.block_count", [4] * 4, "llama.block_count = [4, 4, 4, 4] must be a single integer"),
        ("llama.context_length", 0, "llama.context_length = 0 must be an integer >= 1"),
        ("llama.embedding_length", -1, "llama.embedding_length = -1 must be an integer >= 1"),
        ("llama.attention.head_count", 0, "llama.attention.head_count = 0 must be an integer"),
        (
            "llama.attention.head_count",
            1024,
            "llama.attention.head_count = 1024 must be at most llama.embedding_length = 512",
        ),
        (
            "llama.attention.value_length",
            32,
            "llama.attention.value_length = 32 must equal llama.attention.key_length = 64",
        ),
        (EPS, math.nan, f"{EPS} = nan must be a finite number > 0"),
        (EPS, 0.0, f"{EPS} = 0.0 must be a finite number > 0"),
        ("llama.rope.freq_base", math.inf, "llama.rope.freq_base = inf must be a finite number"),
        ("llama.rope.freq_base", -1.0, "llama.rope.freq_base = -1.0 must be a finite number"),
        ("llama.attention.sliding_window", 0, "llama.attention.sliding_window = 0 must be an"),
        ("llama.vocab_size", 4, "llama.vocab_size = 4 must equal the 3 tokens of tokenizer."),
        (KV_HEADS, [2] * 3, f"{KV_HEADS} = [2, 2, 2] must hold one value for each of 4 layers"),
        (KV_HEADS, [2] * 9, f"{KV_HEADS} = [2, 2, 2, 2, ... (9 values)] must hold one value"),
        (KV_HEADS, [2, 2, 2, 1], f"{KV_HEADS} = [2, 2, 2, 1] differs between layers"),
    ],
)
def test_each_value_is_checked_before_use(key, value, message):
    """One line naming the file, the key, the value and what it must be."""
    with pytest.raises(ConfigError, match="^" + re.escape(f"m.gguf: {message}")) as err:
        config_from_metadata(_llama_meta(**{key: value}), "m.gguf")
    assert "\n" not in str(err.value)


def test_rope_scaling_factor():
    linear = {"llama.rope.scaling.type": "linear"}
    assert config_from_metadata(_llama_meta(**linear)).rope_linear_scale == 1.0
    scaled = _llama_meta(**linear, **{"llama.rope.scaling.factor": 4.0})
    assert config_from_metadata(scaled).rope_linear_scale == 4.0
    # llama.cpp reads a factor of 0 as no scaling; anything negative or not finite is refused
    unscaled = _llama_meta(**linear, **{"llama.rope.scaling.factor": 0.0})
    assert config_from_metadata(unscaled).rope_linear_scale == 1.0
    for bad in (-2.0, math.nan, math.inf):
        meta = _llama_meta(**linear, **{"llama.rope.scaling.factor": bad})
        with pytest.raises(
            ConfigError, match=r"rope\.scaling\.factor = .* must be a finite number >= 0"
        ):
            config_from_metadata(meta)


def test_uniform_per_layer_arrays_are_read():
    meta = _llama_meta(**{"llama.attention.head_count_kv": [4, 4, 4, 4]})
    assert config_from_metadata(meta).n_kv_heads == 4


def test_layer_count_must_match_the_file():
    with pytest.raises(ConfigError, match=r"block_count = 4 must equal the 2 layers whose blk\.N"):
        config_from_metadata(_llama_meta(), "m.gguf", layers_in_file=2)
    assert config_from_metadata(_llama_meta(), layers_in_file=4).n_layers == 4


def test_gemma3_needs_a_sliding_window_of_at_least_one():
    meta = {k.replace("llama.", "gemma3."): v for k, v in _llama_meta().items()}
    meta["general.architecture"] = "gemma3"
    with pytest.raises(
        ConfigError, match=r"missing metadata key gemma3\.attention\.sliding_window"
    ):
        config_from_metadata(meta)
    with pytest.raises(ConfigError, match=r"gemma3\.attention\.sliding_window = 0 must be"):
        config_from_metadata({**meta, "gemma3.attention.sliding_window": 0})
    cfg = config_from_metadata({**meta, "gemma3.attention.sliding_window": 512})
    assert cfg.sliding_window == 512 and cfg.sliding_layers == (True, True, True, True)
