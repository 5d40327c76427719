"""CUDA C++ kernels compiled at run time with NVRTC, for the few kernels the engine writes below Triton.

Why not Triton for these: the one-row 4-bit product must keep many independent 16-byte loads in flight per
thread and spend at most about four instructions per weight; the Triton GEMV (``gemv_triton``) leaves the memory
system and the issue slots both half idle (Nsight Compute, ``benchmarks/results/ncu_kernels_h200_session7.csv``),
and its loop structure is the compiler's, not ours. Why not a compiled extension: the project ships no build
step and the GPU machine has no ``nvcc``; NVRTC ships as a wheel beside every CUDA build of PyTorch (and as
``nvidia-cuda-nvrtc`` on its own, which is what lets the CPU tests compile the sources too).

``compile_cubin`` needs only the NVRTC library, no GPU (the tests compile every source for ``sm_90`` on CPU);
``kernel`` hands the binary to PyTorch's module loader, whose launches go to the current stream (so they are
captured by CUDA graphs like any other kernel).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import sys
from functools import cache
from typing import Any

from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install nvidia-cuda-nvrtc (or a CUDA build of torch, which ships it)"


@cache
def nvrtc() -> ctypes.CDLL:
    """The NVRTC library: the one a CUDA build of torch loaded, else any ``libnvrtc.so.*`` under the Python
    path's ``nvidia`` packages (``nvidia/cu13/lib``, ``nvidia/cuda_nvrtc/lib``); ConfigError naming what to
    install when there is none."""
    names = []
    try:
        import torch

        if torch.version.cuda:
            names.append(f"libnvrtc.so.{torch.version.cuda.split('.')[0]}")
    except ImportError:
        pass
    names.append("libnvrtc.so")
    for root in sys.path:
        names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*[0-9]")), reverse=True)
    for name in names:
        if "builtins" in name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ConfigError(f"the engine's CUDA C++ kernels need NVRTC: {INSTALL_HINT}", field="gemv")


def available() -> bool:
    try:
        nvrtc()
    except ConfigError:
        return False
    return True


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(status).decode()}")


def compile_cubin(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """``source`` compiled for ``sm_<arch>`` (e.g. "90"): the binary of the module holding ``extern "C"`` kernel
    ``name``. A compile error raises RuntimeError with NVRTC's log."""
    return _build(source, name, f"sm_{arch}", options, "CUBIN")


def compile_ptx(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> str:
    """The PTX NVRTC makes of ``source`` for ``compute_<arch>`` (what the tests inspect)."""
    return _build(source, name, f"compute_{arch}", options, "PTX").rstrip(b"\0").decode()


def _build(source: str, name: str, target: str, options: tuple[str, ...], output: str) -> bytes:
    lib = nvrtc()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None),
           "create")
    try:
        opts = [f"--gpu-architecture={target}".encode(), b"--std=c++17", *(o.encode() for o in options)]
        if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, text)
            raise RuntimeError(f"NVRTC could not compile {name}:\n{text.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check(lib, getattr(lib, f"nvrtcGet{output}Size")(prog, ctypes.byref(size)), f"{output} size")
        binary = ctypes.create_string_buffer(size.value)
        _check(lib, getattr(lib, f"nvrtcGet{output}")(prog, binary), output)
        return binary.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_LOADED: dict[tuple[str, str, int], Any] = {}


def kernel(source: str, name: str, device: Any) -> Any:
    """The launchable kernel ``name`` of ``source`` on ``device`` (compiled once per source, architecture and
    device): called as ``k(grid=(x, y, z), block=(x, y, z), args=[tensors and ints], shared_mem=0)``."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    digest = hashlib.sha256(source.encode()).hexdigest()
    key = (digest, name, index)
    if key not in _LOADED:
        major, minor = torch.cuda.get_device_capability(index)
        cubin = compile_cubin(source, name, f"{major}{minor}")
        try:
            from torch.cuda._utils import _cuda_load_module
        except ImportError as exc:  # pragma: no cover - present in every torch this project supports
            raise ConfigError("this torch has no CUDA module loader (torch.cuda._utils._cuda_load_module); "
                              "use gemv='kmajor'", field="gemv") from exc
        with torch.cuda.device(index):
            loaded = _cuda_load_module(cubin, [name])
        if not isinstance(loaded, dict):  # pragma: no cover - a list of names always gives a dict
            raise RuntimeError(f"loading {name} gave no kernel table")
        _LOADED[key] = loaded[name]
        log.info("compiled CUDA kernel %s for sm_%d%d", name, major, minor)
    return _LOADED[key]
