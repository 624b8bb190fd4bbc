"""Instructions per weight of the dp4a decode kernels, read from their sm_90 SASS without a GPU.

At one row of x a decode product must stream its weights at the memory's rate: on an H200 that
leaves about four issue slots per weight (integer units at half rate), so every instruction in
the inner loop counts. Triton's wheel ships ptxas and cuobjdump, so each kernel variant is
compiled here for sm_90 and its machine code read: the instructions of its main loop divided by
the weights one thread handles per iteration, the 16-byte loads, spills and registers.

    python benchmarks/sass.py              (any machine; no GPU needed)
    python benchmarks/sass.py --rows 1,2,4,8  (the owner kernels' default tiles at M rows of x:
                                            instructions per weight, and per weight per row)
    python benchmarks/sass.py --launched   (compile all that gpu_gemv.py launches; --quick: as
                                            gpu_gemv.py --quick, rows of x included)
    python benchmarks/sass.py --cuda       (the CUDA C kernels, kernels/cuda/gemv.cu, compiled
                                            by nvcc at 1, 2 and 4 rows a block: their loop per
                                            lane's 64 weights a row and turn)
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metallic.kernels import quant_gemv as g

CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass(frozen=True)
class Variant:
    """One kernel at one geometry; `weights` is what a program reads per loop iteration, for
    `rows_of_x` rows of x."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    weights: int
    rows_of_x: int = 1


_POINTER_TYPES = {"h_ptr": "*fp16", "d_ptr": "*fp16", "dx_ptr": "*fp32", "xs_ptr": "*fp32",
                  "out_ptr": "*fp32"}  # fmt: skip
_Q4_K_TILE = ("w_ptr", "h_ptr", "xq_ptr", "dx_ptr", "xs_ptr", "out_ptr", "N", "row_words",
              "sb_per_split")  # fmt: skip
_Q4_K_OWNER = ("w_ptr", "w2_ptr", "xq_ptr", "dx_ptr", "xs_ptr", "out_ptr", "N", "n_first", "n_sb",
               "sb_per_split", "out_stride")  # fmt: skip
_Q6_K_TILE = (
    "ql_ptr",
    "qh_ptr",
    "sc_ptr",
    "d_ptr",
    "xq_ptr",
    "dx_ptr",
    "xs_ptr",
    "out_ptr",
    "N",
    "n_sb",
    "sb_per_split",
)
_Q6_K_OWNER = (*_Q6_K_TILE, "out_stride")


def _variant(name: str, fn, args: tuple[str, ...], rows: int, sbs: int, warps: int,
             **extra) -> Variant:  # fmt: skip
    """`fn` at rows x super-blocks a step with `warps`: all pointers 16-byte aligned. An owner
    kernel's M (rows of x, default 1) is in `extra`."""
    signature = {a: _POINTER_TYPES.get(a, "*i32") if a.endswith("_ptr") else "i32" for a in args}
    constexprs = {"BN": rows, "S": sbs, "PARTIAL": False, "ASM": True, "PDL": True, **extra}
    signature |= {c: "constexpr" for c in constexprs}
    m = extra.get("M", 1)
    return Variant(f"{name} {rows}x{sbs} w{warps} M={m}", fn, signature, constexprs, warps,
                   rows * sbs * 256, m)  # fmt: skip


def _owner(qtype: str, rows: int, sbs: int, warps: int, m: int = 1) -> Variant:
    """An owner kernel: "q4_k owner", "q4_k staged" or "q6_k owner"; m rows of x."""
    if qtype == "q6_k owner":
        return _variant(qtype, g._gemv_q6_k_owner_kernel, _Q6_K_OWNER, rows, sbs, warps,
                        HOIST=True, M=m)  # fmt: skip
    return _variant(qtype, g._gemv_q4_k_owner_kernel, _Q4_K_OWNER, rows, sbs, warps,
                    STAGED=qtype == "q4_k staged", HOIST=True, M=m)  # fmt: skip


def variants(row_counts: tuple[int, ...] = ()) -> list[Variant]:
    """The tile kernels at their former K = 4096 default, the owner kernels at a few
    geometries; with `row_counts`, the default geometries of gpu_gemv.py's rows of x instead."""
    if row_counts:
        return _row_variants(row_counts)
    out = [
        _variant("q4_k tile", g._gemv_q4_k_kernel, _Q4_K_TILE, 8, 16, 4, STAGES=1),
        _variant("q6_k tile", g._gemv_q6_k_kernel, _Q6_K_TILE, 8, 16, 4, STAGES=1),
    ]
    for rows, sbs, warps in ((8, 16, 4), (16, 16, 4), (16, 8, 4), (32, 8, 8)):
        out += [_owner(kind, rows, sbs, warps) for kind in ("q4_k owner", "q4_k staged",
                                                            "q6_k owner")]  # fmt: skip
    return out


def _row_variants(row_counts: tuple[int, ...]) -> list[Variant]:
    """The kernels gemv launches by default at the 8B's shapes (gpu_gemv.ROW_SHAPES) for each
    number of rows of x, each distinct tile once."""
    from gpu_gemv import ROW_SHAPES

    from metallic.kernels.quant_gemv import default_geometry, normalized

    seen, out = set(), []
    for _, qtype, n, k, n_parts in ROW_SHAPES:
        for m in row_counts:
            geo = normalized(default_geometry(qtype, n_parts * n, k, m), k)
            key = (qtype, geo.rows, geo.sbs, geo.warps, geo.kernel, m)
            if key not in seen:
                seen.add(key)
                out.append(_launched(qtype, geo, False, m))
    return out


def sass(variant: Variant) -> tuple[str, int]:
    """The variant's SASS for sm_90 and its registers per thread, specialized as Triton does at
    Llama-3-8B's K = 4096: every pointer and integer argument divisible by 16."""
    src = ASTSource(
        fn=variant.fn,
        signature=variant.signature,
        constexprs=variant.constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i, t in enumerate(variant.signature.values())
               if t != "constexpr"},
    )  # fmt: skip
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": variant.num_warps}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        text, usage = (
            subprocess.run([CUOBJDUMP, flag, path], capture_output=True, text=True, check=True)
            .stdout for flag in ("-sass", "-res-usage")
        )  # fmt: skip
    return text, int(re.search(r"REG:(\d+)", usage)[1])


def count(text: str) -> dict[str, int]:
    """Instruction counts of a SASS listing: all, the largest loop's body, its 16-byte loads,
    spills (local loads and stores)."""
    lines = [(int(m[1], 16), m[3], m[4]) for m in _LINE.finditer(text)]
    index = {addr: i for i, (addr, _, _) in enumerate(lines)}
    body = (0, 0)
    for i, (addr, op, args) in enumerate(lines):
        target = re.search(r"0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and int(target[1], 16) < addr:
            start = index.get(int(target[1], 16), i)
            body = max(body, (i - start + 1, start), key=lambda t: t[0])
    loop = lines[body[1] : body[1] + body[0]]
    return {
        "total": len([op for _, op, _ in lines if op != "NOP"]),
        "loop": len([op for _, op, _ in loop if op != "NOP"]),
        "loop_ldg128": len([op for _, op, _ in loop if op.startswith("LDG") and ".128" in op]),
        "loop_ldg": len([op for _, op, _ in loop if op.startswith("LDG")]),
        "loop_dp4a": len([op for _, op, _ in loop if op.startswith("IDP")]),
        "spills": len([op for _, op, _ in lines if op.startswith(("LDL", "STL"))]),
    }


def launched_variants(quick: bool = False) -> list[Variant]:
    """Every kernel variant benchmarks/gpu_gemv.py launches (its sweep, defaults and old
    geometries at each shape; with `quick`, as --quick, rows of x included), for a compile
    check: the GPU may run another Triton version."""
    from gpu_gemv import QUICK_SHAPES, ROW_SHAPES, SHAPES, old_geometry, sweep_geometries

    from metallic.kernels.quant_gemv import default_geometry, normalized

    launches = []  # (format, geometry, rows of x)
    for qtype, n, k in QUICK_SHAPES if quick else SHAPES:
        new = normalized(default_geometry(qtype, n, k), k)
        for geo in [old_geometry(n, k, qtype, 132), new, dataclasses.replace(new, hoist=False),
                    dataclasses.replace(new, kernel="staged"),
                    *sweep_geometries(qtype, n, k, quick)]:  # fmt: skip
            launches.append((qtype, geo, 1))
    if quick:
        for _, qtype, n, k, n_parts in ROW_SHAPES:
            for m in (1, 2, 4, 8):
                launches.append(
                    (qtype, normalized(default_geometry(qtype, n_parts * n, k, m), k), m)
                )
    seen, out = set(), []
    for qtype, geo, m in launches:
        for partial in (False, True) if geo.splits > 1 else (False,):
            key = (qtype, geo.rows, geo.sbs, geo.warps, geo.kernel, geo.hoist, partial, m)
            if key not in seen:
                seen.add(key)
                out.append(_launched(qtype, geo, partial, m))
    return out


def _launched(qtype, geo, partial: bool, m: int) -> Variant:
    """The kernel gemv launches for a format and geometry, M rows of x."""
    from metallic.kernels.quant_gemv import T

    extra: dict[str, object] = {"PARTIAL": partial}
    if geo.kernel == "tile":
        fn = g._gemv_q4_k_kernel if qtype == T.Q4_K else g._gemv_q6_k_kernel
        args = _Q4_K_TILE if qtype == T.Q4_K else _Q6_K_TILE
        extra["STAGES"] = geo.stages
    else:
        fn = g._gemv_q4_k_owner_kernel if qtype == T.Q4_K else g._gemv_q6_k_owner_kernel
        args = _Q4_K_OWNER if qtype == T.Q4_K else _Q6_K_OWNER
        extra |= {"HOIST": geo.hoist, "M": m}
        if qtype == T.Q4_K:
            extra["STAGED"] = geo.kernel == "staged"
    name = f"{qtype.name} {geo.kernel} partial={partial} hoist={geo.hoist}"
    return _variant(name, fn, args, geo.rows, geo.sbs, geo.warps, **extra)


def cuda_table() -> int:
    """The CUDA C kernels' SASS (nvcc for sm_90; NVRTC compiles the same source at run time)."""
    import shutil

    from metallic.kernels.nvrtc import SOURCES

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("sass.py --cuda needs nvcc on PATH (the CUDA toolkit)", file=sys.stderr)
        return 2
    columns = ("kernel", "rows", "SASS", "loop", "weights/lane/turn", "instr/weight",
               "dp4a/weight", "LDG.128", "spills")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for rows in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "gemv.cubin"
            subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-O3", f"-DROWS={rows}", "-o",
                            str(cubin), str(SOURCES / "gemv.cu")], check=True)  # fmt: skip
            text = subprocess.run(
                [CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True
            ).stdout
        for function in text.split("Function : ")[1:]:
            c = count(function)
            weights = 64 * rows
            cells = (function.split()[0], rows, c["total"], c["loop"], weights,
                     f"{c['loop'] / weights:.2f}", f"{c['loop_dp4a'] / weights:.2f}",
                     c["loop_ldg128"], c["spills"])  # fmt: skip
            print("| " + " | ".join(str(x) for x in cells) + " |", flush=True)
    return 0


def main() -> int:
    if "--cuda" in sys.argv:
        return cuda_table()
    if "--launched" in sys.argv:  # compile all that gpu_gemv.py launches; report failures
        failed = 0
        for v in launched_variants("--quick" in sys.argv):
            try:
                sass(v)
            except Exception as error:  # report every failing variant
                failed += 1
                print(f"FAIL {v.name}: {str(error).splitlines()[-1][:200]}", flush=True)
        print(f"{failed} failed")
        return 1 if failed else 0
    row_counts = ()
    if "--rows" in sys.argv:  # --rows 1,2,4,8: the owner kernels' defaults at M rows of x
        row_counts = tuple(int(m) for m in sys.argv[sys.argv.index("--rows") + 1].split(","))
    columns = ("kernel", "SASS", "loop", "weights/thread/iter", "instr/weight",
               "instr/weight/row", "dp4a/weight", "LDG.128", "LDG", "spills", "regs")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for v in variants(row_counts):
        text, regs = sass(v)
        c = count(text)
        per_thread = v.weights / (32 * v.num_warps)
        per_weight = c["loop"] / per_thread
        cells = (v.name, c["total"], c["loop"], f"{per_thread:.0f}", f"{per_weight:.2f}",
                 f"{per_weight / v.rows_of_x:.2f}", f"{c['loop_dp4a'] / per_thread:.2f}",
                 c["loop_ldg128"], c["loop_ldg"], c["spills"], regs)  # fmt: skip
        print("| " + " | ".join(str(x) for x in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
