"""The training stages of `tcsmae bench`: one `Trainer` (tcsmae.pretrain.step's training
setup) measured alone (train_step, batch sweep, FLOPs for MFU, the profile) and fed by the
store loader (end_to_end). FLOPs, peak memory, MFU and the profile are read by
tcsmae.bench.probe. Batches come in the network's dtype and memory format, as the
pretraining loader hands them."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from tcsmae.bench.probe import mfu, peak_memory_gb, profile_steps, reset_peak_memory, step_flops
from tcsmae.bench.stages import timed
from tcsmae.distributed import DistContext, resolve_device
from tcsmae.pipelines.loader import make_loader
from tcsmae.pretrain.batches import SyntheticBatches
from tcsmae.pretrain.step import build_training, train_step


@dataclass
class Trainer:
    """One training setup (tcsmae.pretrain.step.build_training) shared by train_step, the
    sweep and end_to_end."""

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

    def batch(self, batch_size: int) -> dict:
        """A synthetic batch in the network's input format (as the pretraining loader hands it)."""
        setup = self.setup
        return SyntheticBatches(batch_size, self.size, 1, device=self.ctx.device,
                                input_dtype=setup.input_dtype, channels_last=setup.channels_last).batch(0, 0)


def build_trainer(tcfg, device: str) -> Trainer:
    dev = resolve_device(device)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=dev)
    return Trainer(build_training(replace(tcfg, device=str(dev)), ctx), ctx, tcfg.input_size)


def flops_per_pair(trainer: Trainer, pairs: int = 2) -> float:
    """Training FLOPs per pair (tcsmae.bench.probe.step_flops on a synthetic batch of `pairs`)."""
    return step_flops(trainer.setup, trainer.batch(pairs), trainer.ctx.device) / pairs


def measure_train(trainer: Trainer, batch_size: int, seconds: float, flops: float | None = None) -> dict:
    """Training steps (tcsmae.pretrain.step.train_step) on one in-memory batch, torch's stream
    synchronised after each step. peak_mem_gb (tcsmae.bench.probe.peak_memory_gb): GPU = max
    allocated during the timed steps; CPU = the process's peak resident set (everything so far).
    compiled: whether the step was torch.compile'd; compile_s: the host time of its first
    step, compilation included (None when it was compiled before, at another batch size or
    stage, or not at all)."""
    import torch

    dev = trainer.ctx.device
    batch = trainer.batch(batch_size)
    compiling = trainer.setup.compiled and trainer.setup.compile_seconds is None

    def step() -> int:
        train_step(trainer.setup, batch, trainer.ctx)
        trainer.sync()
        return batch_size

    if dev.type == "cuda":
        step()  # cudnn autotuning and allocator growth, before the peak is reset
        reset_peak_memory(dev)
    pairs, elapsed = timed(step, seconds, warmup=2 if dev.type == "cuda" else 1)
    out = {"pairs_per_s": pairs / elapsed, "batch_size": batch_size, "steps": pairs // batch_size,
           "seconds": elapsed, "precision": str(trainer.setup.amp or torch.float32).replace("torch.", ""),
           "channels_last": trainer.setup.channels_last, "compiled": trainer.setup.compiled,
           "compile_s": trainer.setup.compile_seconds if compiling else None}
    out["peak_mem_gb"] = peak_memory_gb(dev)
    out["peak_mem_what"] = ("torch.cuda.max_memory_allocated during the timed steps" if dev.type == "cuda"
                            else "process peak RSS (ru_maxrss), all stages so far")
    if flops:
        out["flops_per_pair"] = flops
        out["tflops"] = flops * out["pairs_per_s"] / 1e12
        out["mfu"], out["mfu_peak"] = mfu(flops * out["pairs_per_s"], dev)
    return out


def profile_train(trainer: Trainer, batch_size: int, trace_path=None) -> dict:
    """tcsmae.bench.probe.profile_steps on a synthetic batch, after one warm-up step."""
    batch = trainer.batch(batch_size)
    train_step(trainer.setup, batch, trainer.ctx)
    trainer.sync()
    return {"batch_size": batch_size,
            **profile_steps(trainer.setup, batch, trainer.ctx, trace_path=trace_path)}


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
    """The store loader (tcsmae.pipelines.loader.make_loader) feeding train_step.

    data_stall = time in next(loader) (plus, on the GPU, the wait for the batch's copy)
    / wall time of the timed loop. Torch's stream is synchronised after each training step,
    so the loader's clock never runs while training kernels are still in flight (and DALI's
    own stream, prefetching later batches, is never waited for). Batches that
    open an epoch (the loader refills its prefetch queue there) are also counted apart:
    `data_stall_within_epoch` leaves them out (a small store has many epoch boundaries).
    """
    dev = trainer.ctx.device
    py_workers = max(1, workers // 2)
    loader = make_loader(store_path, pcfg, batch_size, device=dev.type, num_threads=workers,
                         py_workers=py_workers, device_id=dev.index if dev.type == "cuda" else None)
    loader.set_network_inputs(trainer.setup.input_dtype, trainer.setup.channels_last)
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
    reset_peak_memory(dev)  # on the GPU this stage's own peak, not the batch sweep's before it
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
        out["peak_mem_gb"] = peak_memory_gb(dev)
        out["peak_mem_what"] = ("torch.cuda.max_memory_allocated during the timed steps "
                                "(torch's allocator only; DALI's and CuPy's buffers not included)")
    if flops:
        out["tflops"] = flops * pairs_per_s / 1e12
    del state, loader
    return out

