"""The slices every stage measures: the cached phantom store (when no --data is given) and
the in-memory pool of HU slices for the preprocess stage."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from tcsmae.bench.config import BenchConfig
from tcsmae.errors import UserError

PHANTOM_VERSION = "bench-phantom-v2"  # v2: stores with chunk checksums


def _cache_root() -> Path:
    return Path(os.environ.get("TCSMAE_CACHE") or Path.home() / ".cache" / "tcsmae")


def _phantom_case_arrays(args: tuple) -> tuple[str, str, list]:
    """Worker: draw phantom case `index` and write its arrays (not yet committed)."""
    import hashlib

    from tcsmae.convert.phantom import make_case
    from tcsmae.convert.store import write_case_arrays

    store, cfg, index, codec = args
    case = make_case(cfg, index)
    z, _, _ = case.hu.shape
    origin = list(case.origin_mm)
    sha = hashlib.sha256(f"{PHANTOM_VERSION}:{asdict(cfg)}:{index}".encode()).hexdigest()
    attrs = {
        "spacing_mm": list(case.spacing_mm), "origin_mm": origin,
        "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "z_positions_mm": [origin[2] + k * case.spacing_mm[0] for k in range(z)],
        "patient_id": case.patient_id, "study_uid": "", "series_uid": "",
        "source_sha256": sha, "warnings": [], "source": f"tcsmae phantom ({PHANTOM_VERSION})",
    }
    bf = write_case_arrays(store, case.case_id, case.hu, attrs, labels=case.labels, codec=codec)
    return case.case_id, sha, bf.tolist()


def phantom_store(folder: str | Path, size: int = 512, cases: int = 16, slices: int = 32,
                  processes: int | None = None, codec: str = "zstd") -> Path:
    """A store of phantom cases (HU (slices, size, size) int16 + labels) in `folder`.

    Built once (file lock; reused when complete). Cases are drawn in parallel processes and
    written straight into the store (the DICOM round trip of `tcsmae convert` costs ~10x
    more and is not what this benchmark measures). codec: the store's chunk compression
    (zstd, as `tcsmae convert` writes by default; lz4; none). Returns folder/phantom.zarr.
    """
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    from filelock import FileLock

    from tcsmae.convert.phantom import PhantomConfig
    from tcsmae.convert.store import StoreWriter, open_store

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
                for case_id, sha, bf in pool.map(_phantom_case_arrays, jobs):
                    writer.commit_case(case_id, np.asarray(bf, dtype=np.float32), sha)
    return path


def default_phantom(cfg: BenchConfig, say) -> Path:
    folder = _cache_root() / f"{PHANTOM_VERSION}-512-{cfg.phantom_cases}x{cfg.phantom_slices}"
    say(f"no --data: phantom store of {cfg.phantom_cases} cases x {cfg.phantom_slices} slices "
        f"at 512x512 in {folder} (built once)")
    return phantom_store(folder, 512, cfg.phantom_cases, cfg.phantom_slices)


def slice_pool(store, n: int, seed: int = 0, pad_hu: float = -1024.0):
    """HU of `n` slices (repeated when the store holds fewer), padded to a square.

    Slices are drawn without replacement by a seeded generator among the slices whose
    square side is the store's most common one (one batch must hold one shape).
    Returns (ids (n,) int64 slice ids, hu (n, S, S) int16|float32 HU as stored).
    """
    import numpy as np

    from tcsmae.pipelines.resize import pad_to_square

    side = {cid: max(store.image(cid).shape[1:]) for cid in store.case_ids}
    sides = np.array([side[store.case_ids[c]] for c in store.slice_case])
    common = np.bincount(sides).argmax()
    eligible = np.flatnonzero(sides == common)
    rng = np.random.default_rng(seed)
    ids = rng.permutation(eligible)
    ids = np.resize(ids, n).astype(np.int64)  # repeats the permutation when the store is small
    dtypes = {store.image(store.case_ids[store.slice_case[i]]).dtype for i in ids}
    dtype = np.int16 if dtypes == {np.dtype(np.int16)} else np.float32
    hu = np.empty((n, common, common), dtype=dtype)
    for k, i in enumerate(ids):
        arr = store.image(store.case_ids[store.slice_case[i]])
        hu[k] = pad_to_square(np.asarray(arr[int(store.slice_z[i])]), pad_hu)
    return ids, hu
