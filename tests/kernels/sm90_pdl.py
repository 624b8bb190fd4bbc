"""Compiles every decode-path kernel for sm_90 with PDL on and off, without a GPU; prints, per
kernel, whether its PTX waits on the grid dependency (`griddepcontrol.wait`), as JSON. With
--prefetch instead: per format, where the one-row product's L2 prefetches land in its SASS.

Run in a process without TRITON_INTERPRET (test_pdl.py does): the interpreter replaces the
kernels with Python functions that cannot be compiled. ptxas (shipped in Triton's wheel) then
assembles each PTX, so a kernel that compiles here compiles on the device.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metallic.kernels import activation, attention, host_rows, norm, prepare_weight, rope
from metallic.quant.formats import block_format

qm = importlib.import_module("metallic.kernels.quant_matmul")  # the package exports a function
gv = importlib.import_module("metallic.kernels.quant_gemv")
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_POINTERS = {torch.int32: "*i32", torch.int8: "*i8", torch.float16: "*fp16",
             torch.bfloat16: "*bf16"}  # fmt: skip
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


def compile_sm90(
    fn, constants: dict, pdl: bool, pointers: dict | None = None, **options
) -> triton.compiler.CompiledKernel:
    """`fn` compiled for sm_90 with the given constexprs and PDL, assembled by ptxas."""
    constants = {**constants, "PDL": pdl}
    signature = _signature(fn, pointers or {}, constants)
    source = ASTSource(
        fn, signature, {(fn.arg_names.index(n),): v for n, v in constants.items()}, {}
    )
    kernel = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": pdl, **options}
    )
    assert kernel.asm["cubin"], f"{fn.__name__}: no cubin"
    return kernel


def sass(kernel: triton.compiler.CompiledKernel) -> list[str]:
    """The opcodes of a compiled kernel's SASS, in order (cuobjdump from Triton's wheel)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        text = subprocess.run(
            [str(_TOOLS / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True
        ).stdout
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)


def prefetch_order() -> dict[str, dict[str, object]]:
    """Per format, the one-row float product with PREFETCH (gated too), and the dp4a owner
    kernels with it: their bulk L2 prefetches (UBLKPF) and whether they all come before the
    grid dependency wait (ACQBULK)."""
    result = {}
    for qtype, fmt in qm._FMT_IDS.items():
        layout = block_format(qtype)
        raw = torch.zeros(8 * 256 // layout.block_size * layout.type_size, dtype=torch.uint8)
        planes = qm._launch_args(prepare_weight(raw, qtype, 8, 256))  # for their dtypes
        pointers = {"x_ptr": "*bf16", "x64_ptr": "*i64", "out_ptr": "*bf16"}
        pointers |= {f"p{i}": _POINTERS[plane.dtype] for i, plane in enumerate(planes)}
        for gated in (0, 2):
            constants = dict(_fma_constants(fmt), GATED=gated, PREFETCH=True)
            ops = sass(compile_sm90(qm._quant_kernel, constants, True, pointers, num_warps=4))
            result[f"{qtype.name} gated={gated}"] = _order(ops)
    words = {"xq_ptr": "*i32", "out_ptr": "*bf16"}
    owners = {
        "Q4_K owner": (gv._gemv_q4_k_owner_kernel, {"w_ptr": "*i32", "w2_ptr": "*i32"},
                       {"STAGED": False}),
        "Q4_K staged": (gv._gemv_q4_k_owner_kernel, {"w_ptr": "*i32", "w2_ptr": "*i32"},
                        {"STAGED": True}),
        "Q6_K owner": (gv._gemv_q6_k_owner_kernel, {"ql_ptr": "*i32", "qh_ptr": "*i32",
                                                    "sc_ptr": "*i32", "d_ptr": "*fp16"}, {}),
    }  # fmt: skip
    for name, (fn, planes, extra) in owners.items():
        constants = {"BN": 16, "S": 8, "PARTIAL": False, "ASM": True, "HOIST": True, "M": 1,
                     "PREFETCH": True}  # fmt: skip
        kernel = compile_sm90(fn, constants | extra, True, planes | words, num_warps=4)
        result[name] = _order(sass(kernel))
    return result


def _order(ops: list[str]) -> dict[str, object]:
    """The bulk L2 prefetches of a SASS listing and whether all come before the wait."""
    prefetches = [i for i, op in enumerate(ops) if op.startswith("UBLKPF")]
    wait = ops.index("ACQBULK") if "ACQBULK" in ops else -1
    before = bool(prefetches) and max(prefetches) < wait
    return {"prefetches": len(prefetches), "before_wait": before}


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
    if names == ["--prefetch"]:
        print(json.dumps(prefetch_order()))
        return 0
    table = kernels()
    result = {}
    for name in names or table:
        fn, constants, pointers, options = table[name]
        result[name] = {
            str(pdl): "griddepcontrol.wait"
            in compile_sm90(fn, constants, pdl, pointers, **options).asm["ptx"]
            for pdl in (True, False)
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
