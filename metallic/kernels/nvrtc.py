"""CUDA C kernels compiled at run time by NVRTC and launched through the driver API.

For the hottest decode product a hand-written kernel controls what Triton decides for itself:
which loads go out before the wait on the previous kernel, how many bytes each thread keeps in
flight, which cache each load fills. NVRTC comes with torch's CUDA wheels (a dependency of
theirs), so no compiler is needed on the user's machine; the CPU path and Triton stay as they
are.

A kernel is compiled once per source, macro values and GPU architecture to a cubin (SASS, no
JIT at load), which is kept in metallic's cache folder (`cuda/`), and loaded once per device and
process. Launches go through ``cuLaunchKernelEx`` on torch's current stream, so they are
captured by CUDA graphs like any other, with programmatic dependent launch (kernels/pdl.py)
where the device has it: the kernel must then wait (``griddepcontrol.wait``) before it reads
what the previous kernel writes or writes anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from metallic.errors import MetallicError
from metallic.gguf.cache import cache_dir
from metallic.kernels.pdl import pdl_enabled

SOURCES = Path(__file__).resolve().parent / "cuda"
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = (("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16))


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""

    _fields_ = (
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("n_attrs", ctypes.c_uint),
    )


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    """NVRTC: as torch's CUDA build loaded it (its soname carries CUDA's major version), else
    from the nvidia wheels beside torch or $CUDA_HOME."""
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else ""
    names = [f"libnvrtc.so.{major}"] if major else []
    names.append("libnvrtc.so")
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    for path in _nvrtc_files(major):
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    raise MetallicError(
        f"NVRTC is not available ({', '.join(names)} not found): the CUDA kernels need torch's "
        "CUDA build, which ships it"
    )


def _nvrtc_files(major: str) -> list[Path]:
    """libnvrtc files where pip's nvidia wheels or a CUDA toolkit keep them."""
    folders = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) for p in spec.submodule_search_locations]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    folders.append(Path(cuda_home))
    pattern = f"libnvrtc.so.{major}*" if major else "libnvrtc.so*"
    return sorted(
        path
        for folder in folders
        for path in folder.glob(f"**/{pattern}")
        if "builtins" not in path.name
    )


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise MetallicError(f"the CUDA driver library could not be loaded: {err}") from None
    lib.cuLaunchKernelEx.argtypes = (
        ctypes.POINTER(_LaunchConfig),
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p,
    )
    return lib


def _check_driver(result: int, what: str) -> None:
    if result:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        message = text.value.decode() if text.value else f"error {result}"
        raise MetallicError(f"CUDA {what}: {message}")


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_cubin(source: str, name: str, options: Sequence[str]) -> bytes:
    """The cubin NVRTC makes of `source` (its file name `name`, for messages) with `options`
    (an ``--gpu-architecture=sm_XX`` among them); a failed compile raises with NVRTC's log."""
    lib = _nvrtc()
    program = ctypes.c_void_p()

    def check(result: int, what: str) -> None:
        if result:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            text = lib.nvrtcGetErrorString(result).decode()
            raise MetallicError(f"NVRTC {what} of {name}: {text}")

    check(
        lib.nvrtcCreateProgram(
            ctypes.byref(program), source.encode(), name.encode(), 0, None, None
        ),
        "program",
    )
    try:
        encoded = [o.encode() for o in options]
        result = lib.nvrtcCompileProgram(
            program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded)
        )
        if result:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, log)
            raise MetallicError(f"NVRTC could not compile {name}:\n{log.value.decode().strip()}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(program, cubin), "cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _options(arch: str, defines: Mapping[str, int]) -> list[str]:
    return [
        f"--gpu-architecture={arch}",
        "--std=c++17",
        *(f"-D{key}={value}" for key, value in sorted(defines.items())),
    ]


def cached_cubin(file: str, defines: Mapping[str, int], arch: str) -> bytes:
    """The cubin of kernels/cuda/`file` with `defines` for `arch` (such as "sm_90"), from
    metallic's cache folder when an earlier run compiled the same source the same way."""
    source = (SOURCES / file).read_text()
    options = _options(arch, defines)
    identity = "\0".join([source, *options, repr(nvrtc_version())])
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    path = cache_dir() / "cuda" / f"{Path(file).stem}-{key}.cubin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    cubin = compile_cubin(source, file, options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(cubin)
        temporary.replace(path)  # whole or absent, for processes compiling side by side
    except OSError:
        pass  # a read-only cache costs a compile per process, nothing more
    return cubin


def _ensure_context(index: int) -> None:
    """Make device `index`'s primary context (torch's) current on this thread if no context is:
    the driver API, unlike the runtime, does not make one current by itself."""
    driver = _driver()
    context = ctypes.c_void_p()
    _check_driver(driver.cuCtxGetCurrent(ctypes.byref(context)), "context")
    if context.value:
        return
    device = ctypes.c_int()
    _check_driver(driver.cuDeviceGet(ctypes.byref(device), index), "device")
    _check_driver(driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "context")
    _check_driver(driver.cuCtxSetCurrent(context), "context")


class CudaKernel:
    """One `extern "C"` kernel of a cubin, loaded on one device."""

    def __init__(self, cubin: bytes, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.pdl = pdl_enabled(torch.device("cuda", index))
        self._module = ctypes.c_void_p()
        self._function = ctypes.c_void_p()
        self._cubin = ctypes.create_string_buffer(cubin, len(cubin))
        with torch.cuda.device(index):
            _ensure_context(index)
            driver = _driver()
            _check_driver(driver.cuModuleLoadData(ctypes.byref(self._module), self._cubin), name)
            _check_driver(
                driver.cuModuleGetFunction(
                    ctypes.byref(self._function), self._module, name.encode()
                ),
                name,
            )

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[torch.Tensor | int],
    ) -> None:
        """Launch on the device's current stream (captured by a CUDA graph being recorded
        there), with PDL where the device has it. Tensors pass their device addresses, ints
        pass as 32-bit ints, and a last int says whether the launch is programmatic: the kernel
        waits on its predecessor under a branch on it (ptxas hoists an unconditional wait above
        the loads meant to go out before it)."""
        values = [
            ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a)
            for a in (*args, int(self.pdl))
        ]
        params = (ctypes.c_void_p * len(values))(
            *(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values)
        )
        config = _LaunchConfig()
        config.grid[:] = grid
        config.block[:] = block
        attribute = _LaunchAttribute()
        if self.pdl:
            attribute.id = _PROGRAMMATIC_STREAM_SERIALIZATION
            attribute.value[0] = 1
            config.attrs = ctypes.pointer(attribute)
            config.n_attrs = 1
        here = torch.cuda.current_device() == self.index
        with contextlib.nullcontext() if here else torch.cuda.device(self.index):
            config.stream = torch.cuda.current_stream(self.index).cuda_stream
            _ensure_context(self.index)
            result = _driver().cuLaunchKernelEx(ctypes.byref(config), self._function, params, None)
        _check_driver(result, f"launch of {self.name}")


@functools.cache
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


_LOADED: dict[tuple[str, str, tuple[tuple[str, int], ...], int], CudaKernel] = {}


def kernel(file: str, name: str, defines: Mapping[str, int], device: torch.device) -> CudaKernel:
    """`name` from kernels/cuda/`file` compiled with `defines`, loaded on `device` (once per
    process)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (file, name, tuple(sorted(defines.items())), index)
    if key not in _LOADED:
        cubin = cached_cubin(file, defines, _arch(index))
        _LOADED[key] = CudaKernel(cubin, name, index)
    return _LOADED[key]
