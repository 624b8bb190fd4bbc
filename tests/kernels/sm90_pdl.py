"""Compiles every decode-path kernel for sm_90 with PDL on and off, without a GPU; prints, per
kernel, whether its PTX waits on the grid dependency (`griddepcontrol.wait`), as JSON.

Run in a process without TRITON_INTERPRET (test_pdl.py does): the interpreter replaces the
kernels with Python functions that cannot be compiled. ptxas (shipped in Triton's wheel) then
assembles each PTX, so a kernel that compiles here compiles on the device.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metallic.kernels import activation, attention, host_rows, norm, rope

qm = importlib.import_module("metallic.kernels.quant_matmul")  # the package exports a function
_FLOATS = {"eps", "qk_scale"}


def _signature(fn: triton.JITFunction, pointers: dict[str, str], constants: dict) -> dict:
    """Argument types: pointers as given (default f32), named floats f32, the rest i32."""
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = pointers[name]
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "fp32" if name in _FLOATS else "i32"
    return types


def compile_sm90(fn, constants: dict, pdl: bool, pointers: dict | None = None, **options) -> str:
    """The PTX of `fn` for sm_90 with the given constexprs and PDL, assembled by ptxas."""
    constants = {**constants, "PDL": pdl}
    signature = _signature(fn, pointers or {}, constants)
    source = ASTSource(
        fn, signature, {(fn.arg_names.index(n),): v for n, v in constants.items()}, {}
    )
    kernel = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": pdl, **options}
    )
    assert kernel.asm["cubin"], f"{fn.__name__}: no cubin"
    return kernel.asm["ptx"]


def _fma_constants(fmt: int) -> dict:
    """The FMA mode's constexprs for a K of 640 (Gemma 3 270M's width) and bf16 x packs."""
    sbs, groups, words, rows = qm._geometry(fmt, qm._MODE_FMA, 640)
    return {
        "FMT": fmt, "MODE": qm._MODE_FMA, "G": groups, "W": words, "SBS": sbs, "BN": rows,
        "BM": 1, "XKIND": qm._X_BF16, "EVEN": True, "PARTIAL": False, "PREC": "tf32", "GATED": 0,
    }  # fmt: skip


def kernels() -> dict[str, tuple]:
    """name -> (kernel, constexprs, pointer types, options): the shapes a decode step uses."""
    q8 = qm._FMT_IDS[qm.GGMLQuantizationType.Q8_0]
    q8_planes = {"p0": "*i32", "p1": "*fp16", "p2": "*i32", "p3": "*i32"}
    bf16 = {"x_ptr": "*bf16", "x64_ptr": "*i64", "out_ptr": "*bf16", **q8_planes}
    dequant = dict(_fma_constants(q8), MODE=qm._MODE_DEQUANT, XKIND=qm._X_SINGLE)
    dequant.update(BN=qm._DEQUANT_ROWS, G=qm._geometry(q8, qm._MODE_DEQUANT, 640)[1])
    decode = {"HEAD_DIM": 256, "KV_BLOCK": 16, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 256,
              "DOT_PRECISION": "tf32"}  # fmt: skip
    kv_bf16 = {"q_ptr": "*bf16", "out_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
               "table_ptr": "*i32", "seq_lens_ptr": "*i32", "arrivals_ptr": "*i32"}  # fmt: skip
    no_store = {"STORE": False, "BLOCK_S": 1, "BLOCK_D": 1}

    def store(head_dim: int) -> dict:
        return {"STORE": True, "BLOCK_S": 1, "BLOCK_D": head_dim}

    rope_bf16 = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "k_pool_ptr", "v_pool_ptr")}
    rope_bf16 |= {"pos_ptr": "*i32", "block_table_ptr": "*i32", "cu_q_ptr": "*i32"}
    return {
        "rms_norm": (norm._rms_norm_kernel, {"HAS_PRE": True, "HAS_RESIDUAL": True,
                                              "BLOCK_R": 1, "BLOCK_D": 1024}, {}, {}),
        "rope": (rope._rope_kernel, {"NEOX": False, "BLOCK_H": 32, "BLOCK_HALF": 64,
                                     **no_store}, {"pos_ptr": "*i32"}, {}),
        "rope_store_kv": (rope._rope_kernel, {"NEOX": False, "BLOCK_H": 32, "BLOCK_HALF": 64,
                                              **store(128)}, rope_bf16, {}),
        "norm_rope": (rope._norm_rope_kernel, {"BLOCK_H": 8, "BLOCK_HALF": 128, "BLOCK_REST": 1,
                                               **no_store}, {"pos_ptr": "*i32"}, {}),
        "norm_rope_store_kv": (rope._norm_rope_kernel, {"BLOCK_H": 8, "BLOCK_HALF": 128,
                                                        "BLOCK_REST": 1, **store(256)},
                               rope_bf16, {}),
        "gated": (activation._gated_kernel, {"KIND": 1, "BLOCK": 1024}, {}, {}),
        "store_kv": (attention._store_kv_kernel,
                     {"HEAD_DIM": 256, "BLOCK_T": 1, "BLOCK_HD": 256, "BLOCK_D": 256},
                     {"table_ptr": "*i32", "cu_q_ptr": "*i32", "pos_ptr": "*i32"}, {}),
        "decode_attention": (attention._decode_kernel, {**decode, "SPLIT": True, "MERGE": True},
                             kv_bf16, {"num_warps": 4, "num_stages": 3}),
        "decode_attention_unmerged": (attention._decode_kernel,
                                      {**decode, "SPLIT": True, "MERGE": False}, kv_bf16,
                                      {"num_warps": 4, "num_stages": 3}),
        "combine": (attention._combine_kernel, {"HEAD_DIM": 256, "BLOCK_M": 16, "BLOCK_D": 256,
                                                "BLOCK_S": 4}, {}, {}),
        "prefill_attention": (attention._prefill_kernel, {**decode, "BLOCK_M": 64},
                              {**kv_bf16, "cu_q_ptr": "*i32", "q_pos_ptr": "*i32"},
                              {"num_warps": 8, "num_stages": 2}),
        "gather_host_rows": (host_rows._gather_kernel, {"BLOCK": 256},
                             {"src_ptr": "*i32", "ids_ptr": "*i32", "out_ptr": "*i32"}, {}),
        "quant_fma": (qm._quant_kernel, _fma_constants(q8), bf16, {"num_warps": 4}),
        # Gemma's gate|up with its GeGLU applied in the product (GATED = 1 + the kind)
        "quant_fma_gated": (qm._quant_kernel, dict(_fma_constants(q8), GATED=2), bf16,
                            {"num_warps": 4}),
        "quant_dequant": (qm._quant_kernel, dequant, {**bf16, "x_ptr": "*fp32",
                          "x64_ptr": "*fp32", "out_ptr": "*fp32"}, {"num_warps": 4}),
        "sum_splits": (qm._sum_splits_kernel, {"SPLIT": 4, "BLOCK": 1024, "GATED": 0}, {}, {}),
        "sum_splits_gated": (qm._sum_splits_kernel, {"SPLIT": 4, "BLOCK": 1024, "GATED": 1}, {},
                             {}),
    }  # fmt: skip


def main(names: list[str]) -> int:
    table = kernels()
    result = {}
    for name in names or table:
        fn, constants, pointers, options = table[name]
        result[name] = {
            str(pdl): "griddepcontrol.wait" in compile_sm90(fn, constants, pdl, pointers, **options)
            for pdl in (True, False)
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
