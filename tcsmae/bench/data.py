"""The slices every stage measures: the cached phantom store (when no --data is given) and
the in-memory pool of HU slices for the preprocess stage."""

from __future__ import annotations

from pathlib import Path

from tcsmae.bench.config import BenchConfig
from tcsmae.phantom.store import PHANTOM_VERSION, cache_root, phantom_store
from tcsmae.pipelines.resize import pad_to_square


def default_phantom(cfg: BenchConfig, say) -> Path:
    folder = cache_root() / f"{PHANTOM_VERSION}-512-{cfg.phantom_cases}x{cfg.phantom_slices}"
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
