"""Loading weights: formats metallic cannot decode are refused at load, naming file and tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from metallic.errors import GGUFError
from metallic.gguf.reader import open_gguf
from metallic.models.weights import WeightLoader


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
