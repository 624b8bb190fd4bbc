import math

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
    with pytest.raises(ConfigError, match="do not divide"):
        config_from_metadata(_llama_meta(**{"llama.attention.head_count_kv": 3}))
    with pytest.raises(ConfigError, match="non-negative integer"):
        config_from_metadata(_llama_meta(**{"llama.block_count": "four"}))
    with pytest.raises(ConfigError, match="rope scaling"):
        config_from_metadata(_llama_meta(**{"llama.rope.scaling.type": "yarn"}))
