"""Facts about the machine a result was measured on: CPU, GPU, package versions. (The dense
bf16 peaks of known GPUs, the denominator of MFU, are tcsmae.bench.probe.GPU_PEAK_BF16.)"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    names = {"dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
             "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy")}.get(module, (module,))
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def machine_info() -> dict:
    """CPU model and count, GPU name, versions of torch/DALI/CuPy/zarr and friends."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "tcsmae": _version("tcsmae"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "dali": _version("dali"), "cupy": _version("cupy"),
            "zarr": _version("zarr"), "numpy": _version("numpy"), "scipy": _version("scipy"),
            "segmentation_models_pytorch": _version("segmentation-models-pytorch"),
        },
    }
