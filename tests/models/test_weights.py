"""Loading weights: formats metallic cannot decode are refused at load, naming file and tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from metallic.errors import GGUFError
from metallic.gguf.reader import open_gguf
from metallic.models.weights import WeightLoader
from metallic.ops.linear import LinearWeight


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.TQ2_0])
def test_unsupported_type_is_a_one_line_error(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = 4, 256
    writer = GGUFWriter(str(path), "llama")
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    loader = WeightLoader(open_gguf(path), torch.device("cpu"), torch.float32)
    with pytest.raises(GGUFError) as err:
        loader.dense("blk.0.attn_q.weight", rows, cols)
    message = str(err.value)
    assert message.startswith(str(path))
    assert f"unsupported tensor type {qtype.name} in tensor blk.0.attn_q.weight" in message
    assert "\n" not in message


def test_a_stack_mixing_q5_0_and_q8_0_is_held_as_one_q8_0_part(tmp_path):
    """Gemma 3 270M's q|k|v in half its layers: Q5_0 q and k beside a Q8_0 v. The kernels launch
    once per format run, so the loader widens q and k to Q8_0 (losslessly), and the memory plan
    counts the widened bytes."""
    from metallic.gguf.config import config_from_metadata
    from metallic.models.weights import estimate_bytes, load_weights
    from metallic.quant import dequantize_rows
    from metallic.testing.synthetic import write_synthetic_model

    path = write_synthetic_model(
        tmp_path / "g.gguf", "tiny-gemma3", {"base": "Q5_0", "blk.*.attn_v.weight": "Q8_0"}
    )
    gguf = open_gguf(path)
    config = config_from_metadata(gguf.metadata)
    weights = load_weights(gguf, config, torch.device("cpu"), torch.float32, native=True)
    qkv = weights.layers[0].qkv
    assert qkv.ggml_types == (GGMLQuantizationType.Q5_0,) * 2 + (GGMLQuantizationType.Q8_0,)
    (part,) = qkv.native or ()
    assert part.ggml_type == GGMLQuantizationType.Q8_0 and part.n == qkv.out_features
    quants, scales = part.planes
    values = quants.view(torch.int8).view(part.n, -1, 32).float() * scales.float()[..., None]
    names = [f"blk.0.attn_{kind}.weight" for kind in "qkv"]
    expected = torch.cat(
        [dequantize_rows(gguf.tensor(n).raw_bytes(), gguf.tensor(n).ggml_type, gguf.tensor(n).shape)
         for n in names]
    )  # fmt: skip
    assert torch.equal(values.view(part.n, -1), expected)
    assert part.nbytes > sum(gguf.tensor(n).n_bytes for n in names)  # q and k widened
    layer = vars(weights.layers[0]).values()
    matrices = sum(w.nbytes for w in layer if isinstance(w, LinearWeight))
    vectors = sum(v.numel() * 4 for v in layer if isinstance(v, torch.Tensor))
    _, per_layer = estimate_bytes(gguf, config, torch.float32, native=True)
    assert per_layer[0] == matrices + vectors
