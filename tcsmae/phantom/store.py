"""The phantom as a ready-made store, built once in the user cache and reused.

`phantom_store` draws cases in parallel processes and writes their arrays straight through
the store writer (the DICOM round trip of `tcsmae phantom` + `tcsmae convert` gives the same
HU and costs ~10x more); `default_store` is pretraining's embedded default data, and the
benchmark keeps its own 512x512 stores beside it. PHANTOM_VERSION names every cached store,
so a change of the anatomy or the store format rebuilds them.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from filelock import FileLock

from tcsmae.errors import UserError
from tcsmae.phantom.anatomy import PhantomConfig, make_case
from tcsmae.store.reader import open_store
from tcsmae.store.writer import StoreWriter, write_case_arrays

PHANTOM_VERSION = "phantom-v3"  # v3: one builder for pretraining and the benchmark
DEFAULT_CASES, DEFAULT_SLICES, DEFAULT_SIZE = 16, 32, 256


def cache_root() -> Path:
    """$TCSMAE_CACHE, else ~/.cache/tcsmae."""
    return Path(os.environ.get("TCSMAE_CACHE") or Path.home() / ".cache" / "tcsmae")


def _case_arrays(args: tuple) -> tuple[str, str, list]:
    """Worker: draw phantom case `index` and write its arrays (not yet committed)."""
    store, cfg, index, codec = args
    case = make_case(cfg, index)
    z = case.hu.shape[0]
    origin = list(case.origin_mm)
    sha = hashlib.sha256(f"{PHANTOM_VERSION}:{asdict(cfg)}:{index}".encode()).hexdigest()
    attrs = {
        "spacing_mm": list(case.spacing_mm), "origin_mm": origin,
        "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "z_positions_mm": [origin[2] + k * case.spacing_mm[0] for k in range(z)],
        "patient_id": case.patient_id, "study_uid": "", "series_uid": "",
        "source_sha256": sha, "warnings": [], "source": f"tcsmae phantom ({PHANTOM_VERSION})",
    }
    body = write_case_arrays(store, case.case_id, case.hu, attrs, labels=case.labels, codec=codec)
    return case.case_id, sha, body.tolist()


def phantom_store(folder: str | Path, size: int = 512, cases: int = 16, slices: int = 32,
                  processes: int | None = None, codec: str = "zstd") -> Path:
    """folder/phantom.zarr: `cases` phantom cases of HU (slices, size, size) int16 + labels.

    Built once under a file lock and reused when complete. codec: the chunk compression
    (zstd, as `tcsmae convert` writes by default; lz4; none).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "phantom.zarr"
    cfg = PhantomConfig(cases=cases, seed=0, size=size, slices=slices)
    with FileLock(str(folder / ".build.lock")):
        try:
            if open_store(path).n_slices == cases * slices:
                return path
        except UserError:
            pass
        processes = max(1, min(processes or os.cpu_count() or 1, cases))
        jobs = [(path, cfg, i, codec) for i in range(cases)]
        with StoreWriter(path, codec=codec) as writer:
            with ProcessPoolExecutor(processes) as pool:
                for case_id, sha, body in pool.map(_case_arrays, jobs):
                    writer.commit_case(case_id, np.asarray(body, dtype=np.float32), sha)
    return path


def default_store(is_main: bool, say=print) -> Path:
    """Pretraining's embedded default data, cache_root()/PHANTOM_VERSION/phantom.zarr, built on
    first use by rank 0 (under torchrun the caller makes the other ranks wait at a barrier)."""
    folder = cache_root() / PHANTOM_VERSION
    path = folder / "phantom.zarr"
    if not is_main:
        return path
    try:
        if open_store(path).n_slices == DEFAULT_CASES * DEFAULT_SLICES:
            say(f"no --data given: training on the embedded phantom default {path}")
            return path
    except UserError:
        pass
    say(f"no --data given: building the embedded phantom default in {folder} ({DEFAULT_CASES} synthetic "
        f"chest CT series, {DEFAULT_SLICES} slices of {DEFAULT_SIZE}x{DEFAULT_SIZE}; once)")
    return phantom_store(folder, DEFAULT_SIZE, DEFAULT_CASES, DEFAULT_SLICES, processes=min(4, os.cpu_count() or 1))
