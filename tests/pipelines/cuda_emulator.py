"""Run the CUDA source of pipelines/kernels.py on the CPU, one emulated thread at a time.

Every kernel there is one thread per output element, with no shared memory, no
synchronisation and no atomics, so running its body for each (block, thread) in turn gives
what the GPU computes (up to FMA contraction, which NVRTC applies by default and g++ here
does not). The source is compiled unchanged as C++ with a small shim (`__global__` and
`__device__` erased, `blockIdx`/`blockDim`/`threadIdx` as globals) plus one generated
`emu_<kernel>(blocks, threads, <the kernel's parameters>)` loop per kernel, and loaded
with ctypes.

`numpy_cupy()` is a NumPy stand-in for the few CuPy calls the *_cupy launchers make, so
that the launchers themselves (argument order, dtypes, grid sizes, output shapes) run
here too: tests swap it in for `cupy` and `EmulatedModule` in for the compiled RawModule.
This is a check that can run without a GPU; the GPU tests (marked `gpu`) remain the proof.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import types
from pathlib import Path

import numpy as np

_SHIM = r"""
#include <math.h>
struct emu_dim3 { unsigned int x, y, z; };
static emu_dim3 blockIdx, blockDim, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
"""

_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', re.S)


def kernel_signatures(source: str) -> dict[str, str]:
    """Kernel name -> its parameter list, for every extern "C" __global__ kernel in `source`."""
    return {name: " ".join(params.split()) for name, params in _KERNEL.findall(source)}


def _wrapper(name: str, params: str) -> str:
    names = [re.findall(r"\w+", p)[-1] for p in params.split(",")]
    return (f'extern "C" void emu_{name}(long long emu_blocks, int emu_threads, {params}) {{\n'
            f"    blockDim.x = emu_threads;\n"
            f"    for (long long b = 0; b < emu_blocks; ++b)\n"
            f"        for (int t = 0; t < emu_threads; ++t) {{\n"
            f"            blockIdx.x = (unsigned int)b; threadIdx.x = (unsigned int)t;\n"
            f"            {name}({', '.join(names)});\n"
            f"        }}\n}}\n")


def build(source: str, folder: Path) -> ctypes.CDLL:
    """Compile `source` with the shim and the emu_* loops into folder/kernels.so."""
    code = _SHIM + source + "\n" + "".join(
        _wrapper(name, params) for name, params in kernel_signatures(source).items())
    src = folder / "kernels_emulated.cpp"
    lib = folder / "kernels_emulated.so"
    src.write_text(code)
    subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC",
                    "-o", str(lib), str(src)], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def _c_arg(value):
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise TypeError("a kernel argument array is not C-contiguous")
        return ctypes.c_void_p(value.ctypes.data)
    for np_type, c_type in ((np.int32, ctypes.c_int), (np.int64, ctypes.c_longlong),
                            (np.float32, ctypes.c_float), (np.float64, ctypes.c_double)):
        if type(value) is np_type:
            return c_type(value)
    raise TypeError(f"kernel argument {value!r} of type {type(value).__name__}: pass a NumPy "
                    "scalar of the parameter's exact type (CuPy would misread a Python number)")


class EmulatedModule:
    """Stands in for cupy.RawModule(code=_CUDA_SOURCE): get_function(name)(grid, block, args)."""

    def __init__(self, lib: ctypes.CDLL, source: str):
        self.lib = lib
        self.signatures = kernel_signatures(source)
        self.launches: list[tuple[str, int, int]] = []

    def get_function(self, name: str):
        if name not in self.signatures:
            raise AttributeError(f"no kernel {name!r} in the CUDA source")
        fn = getattr(self.lib, f"emu_{name}")
        fn.restype = None
        n_params = len(self.signatures[name].split(","))

        def launch(grid: tuple, block: tuple, args: tuple) -> None:
            if len(args) != n_params:
                raise TypeError(f"{name}: {len(args)} arguments for {n_params} parameters")
            self.launches.append((name, int(grid[0]), int(block[0])))
            fn(ctypes.c_longlong(int(grid[0])), ctypes.c_int(int(block[0])),
               *[_c_arg(a) for a in args])

        return launch


def numpy_cupy() -> types.ModuleType:
    """A `cupy` module made of NumPy: arrays live in host memory, asnumpy is asarray.
    Device().id is -1, so device-keyed caches never mix with a real GPU's."""
    module = types.ModuleType("cupy")
    module.__dict__.update({k: v for k, v in np.__dict__.items() if not k.startswith("__")})
    module.asnumpy = np.asarray
    module.cuda = types.SimpleNamespace(Device=lambda *a: types.SimpleNamespace(id=-1))
    return module
