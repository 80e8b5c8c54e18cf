"""One whole `tcsmae bench` run: every stage in order on the same slices, into one result
dict (a failing stage is recorded under `errors` and the rest still measured)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tcsmae.bench.config import BenchConfig, train_config
from tcsmae.bench.data import default_phantom, slice_pool
from tcsmae.bench.machine import machine_info
from tcsmae.bench.report import figure
from tcsmae.bench.stages import measure_loader, measure_preprocess_stage, measure_read
from tcsmae.bench.training import (
    batch_sweep,
    build_trainer,
    flops_per_pair,
    measure_end_to_end,
    measure_train,
    profile_train,
)
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.plain import to_plain
from tcsmae.pretrain.engine import git_revision
from tcsmae.store.reader import open_store

# Dotted keys every result file holds (value: a number, or null when not measured).
FIGURE_KEYS = (
    "read.slices_per_s", "read.mb_per_s",
    "preprocess.baseline.slices_per_s", "preprocess.dali_cpu.slices_per_s",
    "preprocess.dali_gpu.slices_per_s",
    "loader.slices_per_s", "loader.source_only_slices_per_s", "loader.reader_processes",
    "train_step.pairs_per_s", "train_step.peak_mem_gb",
    "end_to_end.pairs_per_s", "end_to_end.data_stall",
    "ratios.dali_cpu_over_baseline", "ratios.dali_gpu_over_baseline",
)


def _ratio(num, den):
    return num / den if num and den else None


def _git_revision() -> str | None:

    return git_revision()


def run_bench(cfg: BenchConfig, say=print, save=None, trace_path=None) -> dict:
    """Measure every stage (a failing stage is recorded under `errors` and left null).

    save: optional callable given the result so far after every stage (`complete` is False
    until the end), so a run killed by a time limit still leaves its finished stages.
    With cfg.profile, `profile` holds the training step's top kernels (probe.profile_steps)
    and the profiler trace is written to `trace_path` (when given). One function on purpose:
    the stages read top to bottom in the order they run, each one call into its own module,
    with the shared result dict and failure handling in one place."""
    import traceback

    import torch

    started = time.perf_counter()
    resolve_device(cfg.device)  # UserError for --device cuda without a GPU
    store_path = Path(cfg.data) if cfg.data else default_phantom(cfg, say)
    store = open_store(store_path)
    if store.n_slices < cfg.batch_size:
        raise UserError(f"{store_path} holds {store.n_slices} slices, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size or use a larger store")
    import segmentation_models_pytorch as smp

    if cfg.encoder not in smp.encoders.get_encoder_names():
        raise UserError(f"--encoder {cfg.encoder!r} is not an smp encoder; supported encoders: "
                        f"{smp.encoders.get_encoder_names()}")
    tcfg = train_config(cfg)
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
        "read": None, "preprocess": {"baseline": None, "dali_cpu": None, "dali_gpu": None}, "loader": None,
        "train_step": None, "end_to_end": None, "profile": None, "ratios": {}, "errors": {},
        "stage_seconds": {},
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

    # The read and baseline stages fork DataLoader workers after CUDA was initialised (the
    # device check and machine_info above); that is safe because the children never use
    # CUDA. The end-to-end loader spawns its readers (DALI refuses fork after CUDA init).
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
    result["loader"] = stage("loader", lambda: measure_loader(store_path, pcfg, cfg.device, cfg.batch_size,
                                                              cfg.workers, cfg.seconds))
    trainer = stage("train_setup", lambda: build_trainer(tcfg, cfg.device))
    flops = stage("flop_count", lambda: flops_per_pair(trainer)) if trainer else None
    if trainer is not None:
        train = stage("train_step", lambda: measure_train(trainer, cfg.batch_size, cfg.seconds, flops))
        if train is not None and train.get("compile_s") is not None:
            say(f"[train_step] compiled the training step in {train['compile_s']:.0f} s (its first step)")
        if cfg.profile:
            result["profile"] = stage("profile", lambda: profile_train(trainer, cfg.batch_size, trace_path))
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

    base = figure(result, "preprocess.baseline.slices_per_s")
    result["ratios"] = {
        "dali_cpu_over_baseline": _ratio(figure(result, "preprocess.dali_cpu.slices_per_s"), base),
        "dali_gpu_over_baseline": _ratio(figure(result, "preprocess.dali_gpu.slices_per_s"), base),
        "source_only_over_read": _ratio(figure(result, "loader.source_only_slices_per_s"),
                                        figure(result, "read.slices_per_s")),
    }
    result["stage_seconds"]["total"] = round(time.perf_counter() - started, 2)
    result["complete"] = True
    return result

