"""What the DOT mode's tiles compile to on an H100/H200 (sm_90), without a GPU.

Triton compiles quant_matmul's kernel for sm_90 on the CPU (its wheels bundle ptxas and
cuobjdump); for each (M bucket, format) of the tile table, or for tiles given on the command
line, this prints the registers a thread, spills, shared memory, the programs and warps one
multiprocessor holds at once, and the instructions of the main loop per weight a thread
dequantizes (one step of K). A launch whose shared memory exceeds the multiprocessor's fails on
the GPU ("out of resources"); the interpreter the tests run in cannot see that.

    python benchmarks/sm90_tiles.py                      # the table (a few seconds a tile)
    python benchmarks/sm90_tiles.py --format Q6_K --tile 64,64,8,4,1 --tile 64,128,8,8,1

Figures come from this machine's Triton, not necessarily the GPU's; timings decide
(benchmarks/gpu_batched_matmul.py --sweep).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before triton is imported

import torch
import triton
from gguf import GGMLQuantizationType
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metallic.kernels import prepare_weight
from metallic.quant.formats import block_format

qm = importlib.import_module("metallic.kernels.quant_matmul")

T = GGMLQuantizationType
K = 4096  # steps of up to 512 elements: any K that holds a few gives the same loop
SM90 = {"registers": 65536, "shared": 233472, "warps": 64, "programs": 32, "reserved": 1024}
_POINTER = {torch.int32: "*i32", torch.int8: "*i8", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_tile(qtype: GGMLQuantizationType, tile) -> tuple[bytes, int]:
    """The cubin of the DOT mode for ``qtype`` and ``tile`` (bf16 x, K a multiple of its step)
    and the bytes of shared memory a program takes."""
    fmt = qm._FMT_IDS[qtype]
    sbs, groups, words, rows = qm._geometry(fmt, qm._MODE_DOT, K, tile)
    fmt_bytes = block_format(qtype)
    raw = torch.zeros(64 * K // fmt_bytes.block_size * fmt_bytes.type_size, dtype=torch.uint8)
    packed = prepare_weight(raw, qtype, 64, K)  # only its planes' dtypes matter here
    planes = qm._launch_args(packed)
    fn = qm._quant_kernel
    names = fn.arg_names
    signature = {name: "i32" for name in names}
    signature.update({"x_ptr": "*bf16", "x64_ptr": "*bf16", "out_ptr": "*bf16"})
    signature.update({f"p{i}": _POINTER[plane.dtype] for i, plane in enumerate(planes)})
    constants = {
        "FMT": fmt, "MODE": qm._MODE_DOT, "G": groups, "W": words, "SBS": sbs, "BN": rows,
        "BM": tile.bm, "XKIND": 0, "EVEN": True, "PARTIAL": False, "PREC": "tf32", "PDL": False,
    }  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    aligned = ("x_ptr", "x64_ptr", "out_ptr", "p0", "p1", "p2", "p3", "K", "stride_xm")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = ASTSource(
        fn, {n: signature[n] for n in names},
        {(names.index(n),): v for n, v in constants.items()}, attrs,
    )  # fmt: skip
    options = {"num_warps": tile.warps, "num_stages": tile.stages, "enable_fp_fusion": True}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return kernel.asm["cubin"], kernel.metadata.shared


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(_TOOLS / name), *args], capture_output=True, text=True).stdout


def loop_instructions(sass: str) -> int:
    """Instructions of the longest loop: the span of the widest backward branch."""
    address = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*)$")
    widest = 0
    for line in sass.splitlines():
        match = address.match(line)
        branch = match and re.search(r"\bBRA\s+(0x[0-9a-f]+)", match.group(2))
        if branch and int(branch.group(1), 16) < int(match.group(1), 16):
            widest = max(widest, (int(match.group(1), 16) - int(branch.group(1), 16)) // 16 + 1)
    return widest


def report(qtype: GGMLQuantizationType, tile) -> dict[str, object]:
    cubin, shared = compile_tile(qtype, tile)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _tool("cuobjdump", "-res-usage", f.name)
        sass = _tool("cuobjdump", "-sass", f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    registers, spilled = int(found.group(1)), int(found.group(4))
    per_warp = math.ceil(registers * 32 / 256) * 256
    programs = min(
        SM90["registers"] // (per_warp * tile.warps),
        SM90["shared"] // (shared + SM90["reserved"]),  # 0: more than a program may have
        SM90["warps"] // tile.warps,
        SM90["programs"],
    )
    sbs, _, _, rows = qm._geometry(qm._FMT_IDS[qtype], qm._MODE_DOT, K, tile)
    weights_per_thread = rows * sbs * 256 / (32 * tile.warps)
    return {
        "format": qtype.name, "tile": tile, "registers": registers, "spilled": spilled,
        "shared": shared, "programs_per_sm": programs, "warps_per_sm": programs * tile.warps,
        "instructions_per_weight": loop_instructions(sass) / weights_per_thread,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", action="append", help="ggml type (default: all in the table)")
    parser.add_argument("--tile", action="append", help="bm,bn,groups,warps,stages (repeatable)")
    args = parser.parse_args()
    formats = [T[f.upper()] for f in args.format] if args.format else list(qm._FMT_IDS)
    if args.tile:
        tiles = [qm.DotTile(*map(int, t.split(",")), programs_per_sm=1) for t in args.tile]
        jobs = [(None, q, t) for q in formats for t in tiles]
    else:
        jobs = [(b, q, t) for (b, q), t in qm._DOT_TILES.items() if q in formats]
    print(f"Triton {triton.__version__}, sm_90: {SM90['shared'] // 1024} KB shared memory a SM")
    print(
        f"{'M':>4} {'format':<6} {'bm':>4}{'bn':>5}{'grp':>4}{'warps':>6}{'stages':>7}"
        f"{'regs':>6}{'spill':>6}{'smem KB':>8}{'prog/SM':>8}{'warps/SM':>9}{'instr/w':>8}"
    )
    for bucket, qtype, tile in jobs:
        r = report(qtype, tile)
        fits = "" if r["programs_per_sm"] else "  does not fit: the launch fails"
        print(
            f"{bucket or '-':>4} {qtype.name:<6} {tile.bm:>4}{tile.bn:>5}{tile.groups:>4}"
            f"{tile.warps:>6}{tile.stages:>7}{r['registers']:>6}{r['spilled']:>6}"
            f"{r['shared'] / 1024:>8.0f}{r['programs_per_sm']:>8}{r['warps_per_sm']:>9}"
            f"{r['instructions_per_weight']:>8.2f}{fits}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
