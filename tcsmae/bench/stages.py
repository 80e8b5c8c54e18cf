"""The data stages of `tcsmae bench`: store reads and preprocessing, plus the timed loop
(`timed`) every stage's measurement runs in."""

from __future__ import annotations

import time

from tcsmae.bench.preprocess import measure_preprocess
from tcsmae.pipelines.loader import build_source_pipeline, make_loader
from tcsmae.pipelines.source import SliceSource


def timed(step, seconds: float, warmup: int = 1) -> tuple[int, float]:
    """Call step() (returns items done) `warmup` times, then until `seconds` have passed.
    Returns (items, elapsed seconds) of the timed part (at least one call)."""
    for _ in range(warmup):
        step()
    items, start = 0, time.perf_counter()
    while True:
        items += step()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return items, elapsed


class _ReadSlices:
    """torch Dataset: item i -> decode slice ids[i] (the data stays in the worker)."""

    def __init__(self, store, ids):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        sid = int(self.ids[i])
        self.store.read_slice(int(self.store.slice_case[sid]), int(self.store.slice_z[sid]))
        return 1


def _count(items: list) -> int:
    return len(items)


def measure_read(store, ids, seconds: float, workers: int, batch_size: int) -> dict:
    """Zarr slice reads through CTStore.read_slice (decode + widen to float32).

    ids: (n,) int64 slice ids, read in this (shuffled) order, cycled. One process, then the
    same through zarr-python (`zarr.Array[z]`, the general reader that read_slice bypasses by
    reading shard files directly; `zarr_slices_per_s`), then W DataLoader worker processes
    that decode and drop the slice (nothing shipped back); seconds / 3 each.
    MB/s counts the HU bytes as stored (int16: 2 bytes per pixel).
    """
    import numpy as np
    import torch

    case, zs = store.slice_case, store.slice_z
    first = store.image(store.case_ids[case[ids[0]]])
    bytes_per_slice = int(np.prod(first.shape[1:])) * first.dtype.itemsize
    position = [0]

    def one() -> int:
        sid = ids[position[0] % len(ids)]
        position[0] += 1
        store.read_slice(int(case[sid]), int(zs[sid]))
        return 1

    n, elapsed = timed(one, seconds / 3, warmup=2)
    single = n / elapsed

    def one_via_zarr() -> int:
        sid = ids[position[0] % len(ids)]
        position[0] += 1
        np.asarray(store.image(store.case_ids[case[sid]])[int(zs[sid])], dtype=np.float32)
        return 1

    n_zarr, elapsed_zarr = timed(one_via_zarr, seconds / 3, warmup=2)
    via_zarr = n_zarr / elapsed_zarr

    # an epoch long enough to keep every worker busy (8 batches each), not just the pool's
    repeated = np.resize(np.asarray(ids), max(len(ids), 8 * workers * batch_size))
    loader = torch.utils.data.DataLoader(_ReadSlices(store, repeated), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_count,
                                         persistent_workers=True, prefetch_factor=4)
    state = {"it": iter(loader)}

    def batch() -> int:
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    n_par, elapsed_par = timed(batch, seconds / 3, warmup=workers)
    parallel = n_par / elapsed_par
    del state, loader
    return {"slices_per_s": single, "mb_per_s": single * bytes_per_slice / 1e6,
            "zarr_slices_per_s": via_zarr, "direct_over_zarr": single / via_zarr,
            "slice_shape": list(first.shape[1:]), "stored_dtype": str(first.dtype),
            "parallel_workers": workers, "parallel_slices_per_s": parallel,
            "parallel_mb_per_s": parallel * bytes_per_slice / 1e6,
            "slices_timed": n, "seconds": elapsed}


def measure_preprocess_stage(hu, pcfg, device: str, workers: int, batch_size: int,
                             seconds: float, which=("baseline", "dali_cpu", "dali_gpu")) -> dict:
    """The pipelines' preprocess probe on the pool: hu (n, S, S) int16|float32 HU.

    Returns {baseline, dali_cpu, dali_gpu: {"slices_per_s": float} | None} (see
    tcsmae.bench.preprocess.measure_preprocess: same transform, same batches, W workers).
    """
    import numpy as np

    n_batches = max(2, len(hu) // batch_size)
    if "baseline" in which:
        # the baseline's DataLoader epoch is these batches: >= 4 per worker, or some of the
        # W workers would sit idle and the baseline would be understated
        n_batches = max(n_batches, 4 * workers)
    batches = [hu[(np.arange(batch_size) + k * batch_size) % len(hu)] for k in range(n_batches)]
    return measure_preprocess(batches, pcfg, device, workers=workers, seconds=seconds, which=which)



def measure_loader(store_path, pcfg, device: str, batch_size: int, workers: int, seconds: float) -> dict:
    """The full loader (store -> DALI -> batches on the device) with no training, and its
    parallel external source alone (reads in `workers` reader processes, no processing).

    `source_only_slices_per_s` against `read.slices_per_s` (one process) shows whether the
    reader processes work in parallel; `slices_per_s` against it shows what the processing
    costs. Half the stage's seconds each; epochs wrap around."""
    import torch

    dev = torch.device(device)
    loader = make_loader(store_path, pcfg, batch_size, device=dev.type, num_threads=workers,
                         py_workers=workers, device_id=(dev.index or 0) if dev.type == "cuda" else None)
    state = {"it": iter(loader)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def one_batch() -> int:
        try:
            batch = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            batch = next(state["it"])
        sync()
        return int(batch["original"].shape[0])

    n, elapsed = timed(one_batch, seconds / 2, warmup=2)
    out = {"slices_per_s": n / elapsed, "reader_processes": workers, "threads": workers,
           "batch_size": batch_size, "device": str(dev), "slices_timed": n, "seconds": elapsed,
           "hu_transport_dtype": str(loader._source.hu_dtype)}
    del state, loader

    source = SliceSource(store_path, pcfg, batch_size)
    pipe = build_source_pipeline(source, batch_size, workers)
    pipe.build()

    def one_read() -> int:
        try:
            pipe.run()
        except StopIteration:  # the source's epoch ended: start the next one
            pipe.reset()
            pipe.run()
        return batch_size

    n_src, elapsed_src = timed(one_read, seconds / 2, warmup=workers)
    out["source_only_slices_per_s"] = n_src / elapsed_src
    del pipe
    return out
