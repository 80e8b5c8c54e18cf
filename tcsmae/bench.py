"""`tcsmae bench`: throughput of every stage, alone and together, on the same slices.

    tcsmae bench [--data STORE.zarr] [--device cpu|cuda] [--workers W] [--batch-size N]
                 [--size 256] [--seconds S] [--quick] [--encoder NAME] --out FILE.json

Stages (each capped by --seconds of timed work after a short warm-up):

    read         Zarr slice reads through the store API, one process and W processes:
                 slices/s and MB/s of HU as stored (int16 = 2 bytes per pixel)
    preprocess   the same transform (windows, Sobel edges, resize, tissue mask) from HU
                 batches already in host memory (pinned for the GPU): baseline = plain torch
                 DataLoader with W workers running NumPy/SciPy, dali_cpu = the package's
                 CPU path with W threads, dali_gpu = the GPU path (null without a GPU)
    train_step   training steps on in-memory batches (pairs/s, peak memory, MFU on a GPU
                 from FLOPs counted by torch.utils.flop_counter against the GPU's dense
                 bf16 peak, e.g. 989 TFLOP/s for an H100 SXM)
    end_to_end   the store loader feeding training: pairs/s and data_stall = time spent in
                 next(loader) / wall time (the GPU is synchronised after every step, so
                 kernel time is never charged to the loader)

With no --data, phantom chest CT at 512x512 (tcsmae.convert.phantom) is written into a
store in the cache ($TCSMAE_CACHE or ~/.cache/tcsmae) once. The JSON result holds
`machine`, `config` and the figures under fixed keys (see `FIGURE_KEYS`); a figure that was
not measured is null. `--quick` is the demo preset (mit_b0, 128x128, batch 8, 2 s a stage).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tcsmae.errors import UserError

HELP = "measure throughput: Zarr reads, preprocessing (NumPy baseline vs DALI CPU/GPU), training steps, end to end"

PHANTOM_VERSION = "bench-phantom-v1"

# Dotted keys every result file holds (value: a number, or null when not measured).
FIGURE_KEYS = (
    "read.slices_per_s", "read.mb_per_s",
    "preprocess.baseline.slices_per_s", "preprocess.dali_cpu.slices_per_s",
    "preprocess.dali_gpu.slices_per_s",
    "train_step.pairs_per_s", "train_step.peak_mem_gb",
    "end_to_end.pairs_per_s", "end_to_end.data_stall",
    "ratios.dali_cpu_over_baseline", "ratios.dali_gpu_over_baseline",
)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; `asdict` goes into the result file."""

    data: str | None = None
    """Store to read (None = the cached 512x512 phantom store)."""
    device: str = "cpu"
    """'cpu' or 'cuda' (train_step, end_to_end and dali_gpu run there)."""
    workers: int = 2
    """Baseline DataLoader workers = DALI CPU threads = read processes (same W for all)."""
    batch_size: int = 30
    """Slices per batch in every stage (the paper's training batch is 30)."""
    size: int = 256
    """Output side in pixels (the paper: 256)."""
    seconds: float = 10.0
    """Timed seconds per stage (after warm-up); every stage is capped by it."""
    encoder: str = "mit_b2"
    """smp encoder of the trained U-Net (the paper: mit_b2)."""
    quick: bool = False
    """The demo preset was asked for (mit_b0, 128x128, batch 8, 2 s per stage)."""
    pool_slices: int = 256
    """Distinct slices held in memory for the preprocess stage (cycled)."""
    batch_sweep: tuple[int, ...] = ()
    """Extra train_step batch sizes to try (GPU default: 30, 64, 128); best one reported."""
    gpu_preprocess_batch: int = 256
    """dali_gpu is also timed at this batch (GPU only): per-batch overheads hide at 30."""
    phantom_cases: int = 16
    """Phantom cases written when --data is not given."""
    phantom_slices: int = 32
    """Slices per phantom case (512x512 each)."""

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device {self.device!r}: choose cpu or cuda")
        for name in ("workers", "batch_size", "pool_slices", "phantom_cases", "phantom_slices",
                     "gpu_preprocess_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.size < 32 or self.size % 32:
            raise UserError(f"--size {self.size}: use a multiple of 32 (the U-Net downsamples 5 times), "
                            "e.g. 256 (paper) or 128 (quick)")
        if not self.seconds > 0:
            raise UserError(f"--seconds {self.seconds}: must be > 0")
        if any(b < 1 for b in self.batch_sweep):
            raise UserError(f"batch sweep {self.batch_sweep}: batch sizes must be >= 1")


# ----------------------------------------------------------------------------- machine


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


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- stages


def _timed(step, seconds: float, warmup: int = 1) -> tuple[int, float]:
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
    same through zarr-python (`zarr.Array[z]`, what read_slice did before it read shard files
    directly; `zarr_slices_per_s`), then W DataLoader worker processes that decode and drop
    the slice (nothing shipped back); seconds / 3 each.
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

    n, elapsed = _timed(one, seconds / 3, warmup=2)
    single = n / elapsed

    def one_via_zarr() -> int:
        sid = ids[position[0] % len(ids)]
        position[0] += 1
        np.asarray(store.image(store.case_ids[case[sid]])[int(zs[sid])], dtype=np.float32)
        return 1

    n_zarr, elapsed_zarr = _timed(one_via_zarr, seconds / 3, warmup=2)
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

    n_par, elapsed_par = _timed(batch, seconds / 3, warmup=workers)
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
    tcsmae.pipelines.throughput.measure_preprocess: same transform, same batches, W workers).
    """
    import numpy as np

    from tcsmae.pipelines.throughput import measure_preprocess

    n_batches = max(2, len(hu) // batch_size)
    if "baseline" in which:
        # the baseline's DataLoader epoch is these batches: >= 4 per worker, or some of the
        # W workers would sit idle and the baseline would be understated
        n_batches = max(n_batches, 4 * workers)
    batches = [hu[(np.arange(batch_size) + k * batch_size) % len(hu)] for k in range(n_batches)]
    return measure_preprocess(batches, pcfg, device, workers=workers, seconds=seconds, which=which)


def _train_config(cfg: BenchConfig):
    """The pretraining config benchmarked: the paper preset (demo for --quick) with the
    bench's encoder, size, batch and workers."""
    from tcsmae.config import preset

    base = preset("demo" if cfg.quick else "paper")
    return replace(base, model=replace(base.model, encoder=cfg.encoder),
                   pipeline=replace(base.pipeline, size=cfg.size),
                   batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device)


# Dense bf16 peak of known GPUs (datasheet figures, without sparsity), for the MFU estimate.
GPU_PEAK_BF16 = (("H100 PCIe", 756e12, "H100 PCIe dense bf16 756 TFLOP/s"),
                 ("H100", 989e12, "H100 SXM dense bf16 989 TFLOP/s"),
                 ("H200", 989e12, "H200 dense bf16 989 TFLOP/s"),
                 ("A100", 312e12, "A100 dense bf16 312 TFLOP/s"))


def gpu_peak(name: str | None) -> tuple[float | None, str | None]:
    """(FLOP/s, description) of a GPU name's dense bf16 peak; (None, None) when unknown."""
    for key, flops, text in GPU_PEAK_BF16:
        if name and key in name:
            return flops, text
    return None, None


@dataclass
class Trainer:
    """One training setup (tcsmae.engine) shared by train_step, the sweep and end_to_end."""

    setup: object
    ctx: object
    size: int

    def sync(self) -> None:
        """Wait for the work queued on torch's current stream (training kernels, the batch's
        copy out of DALI), not for the whole device: DALI prefetches the next batches on its
        own stream meanwhile, and that is not time the training loop waits for."""
        import torch

        if self.ctx.device.type == "cuda":
            torch.cuda.current_stream(self.ctx.device).synchronize()


def build_trainer(tcfg, device: str) -> Trainer:
    from tcsmae.distributed import DistContext, resolve_device
    from tcsmae.engine import build_training

    dev = resolve_device(device)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=dev)
    return Trainer(build_training(replace(tcfg, device=str(dev)), ctx), ctx, tcfg.input_size)


def flops_per_pair(trainer: Trainer, pairs: int = 2) -> float:
    """Training FLOPs per pair: 3x the forward of both branches (PaLM's MFU convention),
    counted by torch.utils.flop_counter.FlopCounterMode on a batch of `pairs`.

    The forward is counted, not a whole step, because FlopCounterMode's backward formula
    treats depthwise convolutions (MiT's Mix-FFN) as dense and overstates them by ~200x
    (found by the training engineer; tcsmae.engine.measure_train_step counts the same way).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tcsmae.engine import SyntheticBatches

    setup, dev = trainer.setup, trainer.ctx.device
    batch = SyntheticBatches(pairs, trainer.size, 1, device=dev).batch(0, 0)
    amp = setup.amp
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        with FlopCounterMode(display=False) as counter:
            setup.core(batch["masked"], batch["original"])
    return 3.0 * float(counter.get_total_flops()) / pairs


def measure_train(trainer: Trainer, batch_size: int, seconds: float, flops: float | None = None) -> dict:
    """Training steps (tcsmae.engine.train_step) on one in-memory batch, GPU synchronised
    after each step. peak_mem_gb: GPU = max allocated during the timed steps; CPU = the
    process's peak resident set (ru_maxrss, everything so far included)."""
    import resource

    import torch

    from tcsmae.engine import SyntheticBatches, train_step

    dev = trainer.ctx.device
    batch = SyntheticBatches(batch_size, trainer.size, 1, device=dev).batch(0, 0)

    def step() -> int:
        train_step(trainer.setup, batch, trainer.ctx)
        trainer.sync()
        return batch_size

    if dev.type == "cuda":
        step()  # cudnn autotuning and allocator growth, before the peak is reset
        torch.cuda.reset_peak_memory_stats(dev)
    pairs, elapsed = _timed(step, seconds, warmup=2 if dev.type == "cuda" else 1)
    out = {"pairs_per_s": pairs / elapsed, "batch_size": batch_size, "steps": pairs // batch_size,
           "seconds": elapsed, "precision": str(trainer.setup.amp or torch.float32).replace("torch.", ""),
           "channels_last": trainer.setup.channels_last}
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
        out["peak_mem_what"] = "torch.cuda.max_memory_allocated during the timed steps"
    else:
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
        out["peak_mem_what"] = "process peak RSS (ru_maxrss), all stages so far"
    if flops:
        out["flops_per_pair"] = flops
        out["tflops"] = flops * out["pairs_per_s"] / 1e12
        peak, text = gpu_peak(torch.cuda.get_device_name(dev) if dev.type == "cuda" else None)
        out["mfu"] = flops * out["pairs_per_s"] / peak if peak else None
        out["mfu_peak"] = text
    return out


def batch_sweep(trainer: Trainer, sizes: tuple[int, ...], seconds: float, flops: float | None, say) -> dict:
    """train_step at each batch size (out of memory -> recorded, skipped); the fastest wins."""
    import torch

    rows = []
    for b in sizes:
        try:
            r = measure_train(trainer, b, seconds, flops)
            rows.append({k: r.get(k) for k in ("batch_size", "pairs_per_s", "peak_mem_gb", "mfu")})
            say(f"  batch {b}: {r['pairs_per_s']:.1f} pairs/s, {r['peak_mem_gb']:.2f} GB")
        except torch.OutOfMemoryError:
            rows.append({"batch_size": b, "pairs_per_s": None, "error": "out of memory"})
        finally:
            if trainer.ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    measured = [r for r in rows if r["pairs_per_s"]]
    best = max(measured, key=lambda r: r["pairs_per_s"])["batch_size"] if measured else None
    return {"rows": rows, "best_batch_size": best}


def measure_end_to_end(trainer: Trainer, store_path, pcfg, batch_size: int, workers: int,
                       seconds: float, flops: float | None = None) -> dict:
    """The store loader (tcsmae.pipelines.loader.make_loader) feeding engine.train_step.

    data_stall = time in next(loader) (plus, on the GPU, the wait for the batch's copy)
    / wall time of the timed loop. Torch's stream is synchronised after each training step,
    so the loader's clock never runs while training kernels are still in flight (and DALI's
    own stream, prefetching later batches, is never waited for). Batches that
    open an epoch (the loader refills its prefetch queue there) are also counted apart:
    `data_stall_within_epoch` leaves them out (a small store has many epoch boundaries).
    """
    import torch

    from tcsmae.engine import train_step
    from tcsmae.pipelines.loader import make_loader

    dev = trainer.ctx.device
    py_workers = max(1, workers // 2)
    loader = make_loader(store_path, pcfg, batch_size, device=dev.type, num_threads=workers,
                         py_workers=py_workers, device_id=dev.index if dev.type == "cuda" else None)
    state = {"it": iter(loader), "opens_epoch": True}

    def next_batch():
        try:
            batch = next(state["it"])
            opens = state["opens_epoch"]
        except StopIteration:
            state["it"] = iter(loader)
            batch, opens = next(state["it"]), True
        state["opens_epoch"] = False
        return batch, opens

    for _ in range(2):  # warm-up: pipeline build, reader processes, first batches
        batch, _ = next_batch()
        train_step(trainer.setup, batch, trainer.ctx)
    trainer.sync()
    steps, wait, boundary_wait, boundaries = 0, 0.0, 0.0, 0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch, opens = next_batch()
        trainer.sync()
        waited = time.perf_counter() - t0
        wait += waited
        if opens:
            boundaries += 1
            boundary_wait += waited
        train_step(trainer.setup, batch, trainer.ctx)
        trainer.sync()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    pairs_per_s = steps * batch_size / elapsed
    out = {"pairs_per_s": pairs_per_s, "data_stall": wait / elapsed,
           "data_stall_within_epoch": (wait - boundary_wait) / max(elapsed - boundary_wait, 1e-9),
           "steps": steps, "seconds": elapsed, "wait_s": wait, "epoch_boundaries": boundaries,
           "batches_per_epoch": len(loader), "batch_size": batch_size,
           "loader_threads": workers, "loader_reader_processes": py_workers}
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    if flops:
        out["tflops"] = flops * pairs_per_s / 1e12
    del state, loader
    return out


# ----------------------------------------------------------------------------- the run


def _get(result: dict, dotted: str):
    value = result
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _ratio(num, den):
    return num / den if num and den else None


def _git_revision() -> str | None:
    from tcsmae.engine import git_revision

    return git_revision()


def run_bench(cfg: BenchConfig, say=print, save=None) -> dict:
    """Measure every stage (a failing stage is recorded under `errors` and left null).

    save: optional callable given the result so far after every stage (`complete` is False
    until the end), so a run killed by a time limit still leaves its finished stages."""
    import traceback

    import torch

    from tcsmae.config import to_plain
    from tcsmae.convert.store import open_store

    started = time.perf_counter()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    store_path = Path(cfg.data) if cfg.data else default_phantom(cfg, say)
    store = open_store(store_path)
    if store.n_slices < cfg.batch_size:
        raise UserError(f"{store_path} holds {store.n_slices} slices, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size or use a larger store")
    import segmentation_models_pytorch as smp

    if cfg.encoder not in smp.encoders.get_encoder_names():
        raise UserError(f"--encoder {cfg.encoder!r} is not an smp encoder; supported encoders: "
                        f"{smp.encoders.get_encoder_names()}")
    tcfg = _train_config(cfg)
    pcfg = tcfg.pipeline
    pool = max(cfg.pool_slices, 2 * cfg.batch_size)
    if cfg.device == "cuda":
        pool = max(pool, 2 * cfg.gpu_preprocess_batch)
    ids, hu = slice_pool(store, pool, seed=pcfg.seed, pad_hu=pcfg.pad_hu)
    result: dict = {
        "schema": "tcsmae-bench/1",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": _git_revision(),
        "machine": machine_info(),
        "config": {"bench": to_plain(asdict(cfg)), "train": to_plain(tcfg),
                   "data": {"store": str(store_path), "phantom": cfg.data is None,
                            "cases": len(store.case_ids), "slices": store.n_slices,
                            "pool_slices": int(len(ids)), "pool_shape": list(hu.shape[1:]),
                            "pool_dtype": str(hu.dtype)}},
        "read": None, "preprocess": {"baseline": None, "dali_cpu": None, "dali_gpu": None},
        "train_step": None, "end_to_end": None, "ratios": {}, "errors": {}, "stage_seconds": {},
        "complete": False,
    }

    def stage(name: str, fn):
        say(f"[{name}] ...")
        t0 = time.perf_counter()
        try:
            return fn()
        except (Exception, torch.OutOfMemoryError) as exc:  # keep the other stages' figures
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            say(f"[{name}] failed: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
            return None
        finally:
            result["stage_seconds"][name] = round(time.perf_counter() - t0, 2)
            if save is not None:
                save(result)

    # Order: the forked workers (reads, baseline) run before DALI and training touch the GPU
    # (they never use CUDA themselves); the end-to-end loader spawns its readers.
    result["read"] = stage("read", lambda: measure_read(store, ids, cfg.seconds, cfg.workers,
                                                        cfg.batch_size))
    pre = stage("preprocess", lambda: measure_preprocess_stage(hu, pcfg, cfg.device, cfg.workers,
                                                               cfg.batch_size, cfg.seconds))
    if pre is not None:
        result["preprocess"].update(pre)
    big = cfg.gpu_preprocess_batch
    if cfg.device == "cuda" and big != cfg.batch_size:
        large = stage("preprocess_gpu_large_batch", lambda: measure_preprocess_stage(
            hu, pcfg, "cuda", cfg.workers, big, cfg.seconds / 2, which=("dali_gpu",)))
        if large is not None and large.get("dali_gpu"):
            result["preprocess"]["dali_gpu_large_batch"] = {"batch_size": big, **large["dali_gpu"]}
    trainer = stage("train_setup", lambda: build_trainer(tcfg, cfg.device))
    flops = stage("flop_count", lambda: flops_per_pair(trainer)) if trainer else None
    if trainer is not None:
        train = stage("train_step", lambda: measure_train(trainer, cfg.batch_size, cfg.seconds, flops))
        if train is not None and cfg.batch_sweep:
            swept = stage("batch_sweep", lambda: batch_sweep(trainer, cfg.batch_sweep,
                                                             cfg.seconds / len(cfg.batch_sweep),
                                                             flops, say))
            if swept is not None:
                train["batch_sweep"] = swept["rows"]
                train["best_batch_size"] = swept["best_batch_size"]
        result["train_step"] = train
        result["end_to_end"] = stage("end_to_end", lambda: measure_end_to_end(
            trainer, store_path, pcfg, cfg.batch_size, cfg.workers, cfg.seconds, flops))
        best = (train or {}).get("best_batch_size")
        if best and best != cfg.batch_size and result["end_to_end"] is not None:
            at_best = stage("end_to_end_best_batch", lambda: measure_end_to_end(
                trainer, store_path, pcfg, best, cfg.workers, cfg.seconds, flops))
            result["end_to_end"]["at_best_batch"] = at_best

    base = _get(result, "preprocess.baseline.slices_per_s")
    result["ratios"] = {
        "dali_cpu_over_baseline": _ratio(_get(result, "preprocess.dali_cpu.slices_per_s"), base),
        "dali_gpu_over_baseline": _ratio(_get(result, "preprocess.dali_gpu.slices_per_s"), base),
    }
    result["stage_seconds"]["total"] = round(time.perf_counter() - started, 2)
    result["complete"] = True
    return result


def markdown_table(result: dict) -> str:
    """The figures as a Markdown table (unmeasured -> '-')."""
    def fmt(v, digits=1):
        if v is None:
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    g = lambda key: _get(result, key)  # noqa: E731
    bench = result["config"]["bench"]
    rows = [
        ("read", "slices/s, 1 process", fmt(g("read.slices_per_s"))),
        ("read", "MB/s of HU, 1 process", fmt(g("read.mb_per_s"))),
        ("read", "slices/s, 1 process, through zarr-python", fmt(g("read.zarr_slices_per_s"))),
        ("read", "direct / zarr-python", fmt(g("read.direct_over_zarr"), 2)),
        ("read", f"slices/s, {bench['workers']} processes", fmt(g("read.parallel_slices_per_s"))),
        ("preprocess", f"baseline (DataLoader, {bench['workers']} workers) slices/s",
         fmt(g("preprocess.baseline.slices_per_s"))),
        ("preprocess", f"dali_cpu ({bench['workers']} threads) slices/s", fmt(g("preprocess.dali_cpu.slices_per_s"))),
        ("preprocess", "dali_gpu slices/s", fmt(g("preprocess.dali_gpu.slices_per_s"))),
        ("preprocess", f"dali_gpu slices/s at batch {g('preprocess.dali_gpu_large_batch.batch_size') or '-'}",
         fmt(g("preprocess.dali_gpu_large_batch.slices_per_s"))),
        ("preprocess", "dali_cpu / baseline", fmt(g("ratios.dali_cpu_over_baseline"), 2)),
        ("preprocess", "dali_gpu / baseline", fmt(g("ratios.dali_gpu_over_baseline"), 2)),
        ("train_step", f"pairs/s (batch {bench['batch_size']})", fmt(g("train_step.pairs_per_s"))),
        ("train_step", "peak memory GB", fmt(g("train_step.peak_mem_gb"), 2)),
        ("train_step", "MFU", fmt(g("train_step.mfu"), 3)),
        ("train_step", "best batch size", fmt(g("train_step.best_batch_size"))),
        ("end_to_end", "pairs/s", fmt(g("end_to_end.pairs_per_s"))),
        ("end_to_end", "data stall", fmt(g("end_to_end.data_stall"), 3)),
        ("end_to_end", "data stall within epochs", fmt(g("end_to_end.data_stall_within_epoch"), 3)),
        ("end_to_end", f"pairs/s at the best batch ({g('end_to_end.at_best_batch.batch_size') or '-'})",
         fmt(g("end_to_end.at_best_batch.pairs_per_s"))),
        ("end_to_end", "data stall at the best batch", fmt(g("end_to_end.at_best_batch.data_stall"), 3)),
    ]
    optional = {"dali_gpu slices/s at batch", "best batch size", "pairs/s at the best batch",
                "data stall at the best batch"}  # GPU-only rows: shown when measured
    rows = [r for r in rows if r[2] != "-" or not any(r[1].startswith(o) for o in optional)]
    m = result["machine"]
    head = (f"tcsmae bench on {m['gpu'] or 'CPU only'} / {m['cpu_model']} x{m['cpu_count']}: "
            f"{bench['encoder']} at {bench['size']}x{bench['size']}, {bench['device']}")
    lines = [head, "", "| stage | figure | value |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if result["errors"]:
        lines += ["", "errors: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items())]
    return "\n".join(lines)


def readme_row(result: dict, name: str) -> str:
    """One row of bench/README.md's results table for a result file called `name`:

        python -c "import json, sys; from tcsmae.bench import readme_row; \
                   print(readme_row(json.load(open(sys.argv[1])), sys.argv[1]))" FILE.json
    """
    g = lambda key: _get(result, key)  # noqa: E731

    def num(key, digits=1):
        v = g(key)
        return "null" if v is None else f"{v:.{digits}f}"

    m, b = result["machine"], result["config"]["bench"]
    machine = f"{m['gpu'] or 'no GPU'}, {m['cpu_count']} x {m['cpu_model']}"
    settings = (f"{b['encoder']}, {b['size']}x{b['size']}, batch {b['batch_size']}, W = {b['workers']}, "
                f"{b['seconds']:g} s")
    cells = [f"[{Path(name).name}](results/{Path(name).name})", machine,
             f"`{result.get('command', 'tcsmae bench')}` ({settings})",
             f"{num('read.slices_per_s', 0)} / {num('read.parallel_slices_per_s', 0)}",
             num("preprocess.baseline.slices_per_s"), num("preprocess.dali_cpu.slices_per_s"),
             num("preprocess.dali_gpu.slices_per_s"), num("ratios.dali_cpu_over_baseline", 2),
             num("ratios.dali_gpu_over_baseline", 2), num("train_step.pairs_per_s"),
             num("train_step.peak_mem_gb"), num("end_to_end.pairs_per_s"),
             num("end_to_end.data_stall", 3)]
    return "| " + " | ".join(cells) + " |"


def _clean(value):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    import math

    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _clean(value.item())
    return value


def write_result(result: dict, out: str | Path) -> Path:
    """Write the result JSON atomically (temp file in the same folder + os.replace)."""
    from tcsmae.atomic_files import write_json_atomic

    return write_json_atomic(out, _clean(result), indent=2, allow_nan=False)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--data", metavar="STORE.zarr", help="tcsmae store (default: phantom chest CT at 512x512, "
      "built once in $TCSMAE_CACHE or ~/.cache/tcsmae)")
    a("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    a("--workers", type=int, default=None, metavar="W",
      help="baseline DataLoader workers = DALI CPU threads = read-stage processes; the end-to-end "
      "loader gets W threads and W/2 reader processes (default: CPU count)")
    a("--batch-size", type=int, default=None, metavar="N",
      help="batch in every stage (default: 30 on cuda, the paper's; 8 on cpu and with --quick)")
    a("--size", type=int, default=None, metavar="PX", help="output side (default 256; --quick 128)")
    a("--seconds", type=float, default=None, metavar="S",
      help="timed seconds per stage measurement, after warm-up (default 10; --quick 2)")
    a("--encoder", default=None, help="smp encoder (default mit_b2; --quick mit_b0)")
    a("--quick", action="store_true",
      help="demo preset: mit_b0, 128x128, batch 8, 2 s per measurement, a small phantom (< 2 min on 2 CPU cores)")
    a("--pool-slices", type=int, default=None, metavar="N",
      help="distinct slices held in memory for the preprocess stage (default 256; --quick 32)")
    a("--batch-sweep", type=int, nargs="*", default=None, metavar="N",
      help="train_step batch sizes to try for the best one (default on a GPU: 30 64 128; none on the CPU)")
    a("--out", required=True, metavar="FILE.json", help="result file (written atomically)")


def config_from_args(args) -> BenchConfig:
    """BenchConfig from the flags; --quick changes the defaults, explicit flags win."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = bool(args.quick)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sweep = args.batch_sweep
    if sweep is None:
        sweep = (30, 64, 128) if device == "cuda" and not quick else ()
    pick = lambda value, normal, fast: value if value is not None else (fast if quick else normal)  # noqa: E731
    return BenchConfig(
        data=args.data, device=device, workers=pick(args.workers, cpus, cpus),
        # the paper's batch of 30 on a GPU; on a CPU mit_b2 at 30 takes ~75 s and 17 GB a step
        batch_size=pick(args.batch_size, 30 if device == "cuda" else 8, 8), size=pick(args.size, 256, 128),
        seconds=pick(args.seconds, 10.0, 2.0), encoder=pick(args.encoder, "mit_b2", "mit_b0"),
        quick=quick, pool_slices=pick(args.pool_slices, 256, 32), batch_sweep=tuple(sweep),
        # GPU: 1,024 slices, so that epoch boundaries (prefetch refills) are rare at batch 30
        phantom_cases=4 if quick else (32 if device == "cuda" else 16), phantom_slices=16 if quick else 32,
    )


def command_line(args) -> str:
    """The flags as given, as one shell command (recorded in the result)."""
    import shlex

    parts = ["tcsmae", "bench"]
    for flag in ("data", "device", "workers", "batch_size", "size", "seconds", "encoder", "pool_slices"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if args.quick:
        parts.append("--quick")
    if args.batch_sweep is not None:
        parts += ["--batch-sweep", *map(str, args.batch_sweep)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def run(args) -> int:
    cfg = config_from_args(args)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = command_line(args)

    def save(partial: dict) -> None:
        write_result({"command": command, **partial}, args.out)

    result = run_bench(cfg, say, save)
    result["command"] = command
    path = write_result(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {path} ({result['stage_seconds']['total']:.0f} s)")
    return 1 if result["errors"] else 0
