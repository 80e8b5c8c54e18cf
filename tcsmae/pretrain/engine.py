"""The pretraining loop: one step, one epoch, a whole run, and a throughput probe.

    setup = build_training(cfg, ctx)                 # model (DDP/compile), Adam, ExponentialLR
    summary = pretrain(cfg, batches, out_dir, ctx)   # epochs, checkpoints, metrics.jsonl
    measure_train_step(cfg, device, batch_size, seconds) -> {pairs_per_s, peak_mem_gb, mfu, ...}

`batches` is a BatchSource: `batches(epoch, start_step)` returns an iterable of dicts with
`original`, `masked` (N, 3, S, S) float in 0..1, `case_index`, `z` (N,) int64, starting at
batch `start_step` of `epoch` (the data position a checkpoint stores), and
`batches.steps_per_epoch` is the full epoch's batch count per rank. The pipelines' DALI
loader is wrapped into one in tcsmae.pretrain; `SyntheticBatches` is an in-memory one for
tests and benchmarks, deterministic in (seed, epoch, step).

The network runs under bf16 autocast on the GPU (fp32 on the CPU), channels_last; the
losses are always fp32 (see losses.py). A non-finite loss skips the optimiser step on
every rank, logs the batch's slices (case_index, z), and the run aborts after
`cfg.max_nonfinite` such steps in a row.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from tcsmae import __version__ as tcsmae_version
from tcsmae.atomic_files import write_json_atomic
from tcsmae.checkpoint import FORMAT, VERSION, capture_rng_state, restore_rng_state, save_checkpoint
from tcsmae.distributed import DistContext, barrier
from tcsmae.errors import UserError
from tcsmae.plain import to_plain
from tcsmae.pretrain.batches import BatchSource
from tcsmae.pretrain.config import TrainConfig
from tcsmae.pretrain.metrics_log import MetricsLog
from tcsmae.pretrain.step import TrainingSetup, build_training, train_step
from tcsmae.stopping import GracefulStop, TrainingStopped


@dataclass
class Position:
    """Where training stands: `step` global steps done; next batch = (epoch, step_in_epoch)."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    nonfinite_in_a_row: int = 0
    history: list = field(default_factory=list)  # per-step loss values (for callers/tests)


def checkpoint_payload(setup: TrainingSetup, cfg: TrainConfig, pos: Position, ctx: DistContext,
                       pretraining_cases: dict | None, store: str | None = None) -> dict | None:
    """The checkpoint dict on rank 0 (None elsewhere). Collective: call on every rank."""
    rng = capture_rng_state()
    if ctx.distributed:
        states = [None] * ctx.world_size
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    if not ctx.is_main:
        return None
    import segmentation_models_pytorch as smp


    temp = setup.core.temperature
    versions = {"tcsmae": str(tcsmae_version), "torch": str(torch.__version__), "smp": str(smp.__version__),
                "git": git_revision()}
    return {
        "format": FORMAT, "version": VERSION,
        "model": setup.core.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "scaler": setup.scaler.state_dict(),
        "temperature": None if temp is None else float(temp().detach()),
        "epoch": pos.epoch, "step": pos.step,
        "data_position": {"epoch": pos.epoch, "step": pos.step_in_epoch},
        "rng": [{k: v for k, v in s.items()} for s in states],
        "world_size": ctx.world_size,
        "config": to_plain(cfg),
        "input_size": cfg.input_size,
        "pretraining_cases": pretraining_cases or {},
        "store": "" if store is None else str(store),  # so that --resume alone finds the data again
        "versions": versions,
    }


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The git commit of the tcsmae source tree when it is a checkout (None otherwise)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def restore(setup: TrainingSetup, ckpt: dict, ctx: DistContext) -> Position:
    """Load a checkpoint's states into `setup`; returns the position to continue from."""
    try:
        setup.core.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"the checkpoint's weights do not fit the model of this config ({first} ...): resume "
                        "without changing the model (--encoder, --mep-levels, --variant, projection)") from None
    setup.optimizer.load_state_dict(ckpt["optimizer"])
    setup.scheduler.load_state_dict(ckpt["scheduler"])
    setup.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("world_size") == ctx.world_size:
        restore_rng_state(ckpt["rng"][ctx.rank])
    pos = ckpt["data_position"]
    return Position(epoch=int(pos["epoch"]), step_in_epoch=int(pos["step"]), step=int(ckpt["step"]))


def train_one_epoch(setup: TrainingSetup, batches: Iterable[dict], n_steps: int, pos: Position,
                    cfg: TrainConfig, ctx: DistContext, log: MetricsLog,
                    on_checkpoint: Callable[[Position], None], stop: GracefulStop | None = None) -> None:
    """Train on `batches` (the rest of epoch pos.epoch) until the epoch has n_steps steps.

    When `stop` was signalled, saves a checkpoint after the current step and raises
    TrainingStopped (at the epoch's last step the caller's end-of-epoch save does it)."""
    from tqdm.auto import tqdm

    global_batch = cfg.batch_size * ctx.world_size
    lr = setup.optimizer.param_groups[0]["lr"]
    bar = tqdm(total=n_steps, initial=pos.step_in_epoch, desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
               disable=not ctx.is_main, unit="step", dynamic_ncols=True)
    tick, pairs_since = time.perf_counter(), 0
    it = iter(batches)
    while pos.step_in_epoch < n_steps:
        batch = next(it, None)
        if batch is None:
            raise UserError(f"the data ran out after {pos.step_in_epoch} of {n_steps} batches in epoch "
                            f"{pos.epoch}: lower --steps-per-epoch or check the store")
        want_images = cfg.image_every > 0 and (pos.step + 1) % cfg.image_every == 0 and ctx.is_main
        result = train_step(setup, batch, ctx, keep_output=want_images,
                            stop_signum=(stop.signum or 0) if stop is not None else 0)
        pos.step += 1
        pos.step_in_epoch += 1
        pairs_since += global_batch
        slices = None
        if result.finite:
            pos.nonfinite_in_a_row = 0
        else:
            pos.nonfinite_in_a_row += 1
            slices = list(zip(batch["case_index"].tolist(), batch["z"].tolist()))
            if ctx.is_main:
                tqdm.write(f"step {pos.step}: non-finite loss {result.values['loss']}, step skipped; "
                           f"slices (case_index, z) on rank 0: {slices}")
        pos.history.append(result.values)
        if pos.step % cfg.log_every == 0 or not result.finite:
            now = time.perf_counter()
            pairs_per_s = pairs_since / max(now - tick, 1e-9)
            tick, pairs_since = now, 0
            record = {"step": pos.step, "epoch": pos.epoch, **result.values, "lr": lr,
                      "pairs_per_s": pairs_per_s, "skipped": not result.finite}
            if not result.finite:
                record["slices"] = slices
            log.write(record)
            bar.set_postfix(loss=f"{result.values['loss']:.4f}", l_ssim=f"{result.values['loss_ssim']:.4f}",
                            l_con=f"{result.values['loss_con']:.3f}",
                            T=f"{result.values['temperature'] or 0:.4f}", pairs_s=f"{pairs_per_s:.1f}")
        if pos.nonfinite_in_a_row >= cfg.max_nonfinite:
            raise UserError(f"{pos.nonfinite_in_a_row} non-finite losses in a row (last at step {pos.step}): "
                            "training diverged; lower --lr or check the data, then --resume the last checkpoint")
        if want_images:
            log.images(pos.step, result.output)
        bar.update(1)
        if pos.step_in_epoch < n_steps:
            signum = result.stop_signum
            if signum or (cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0):
                on_checkpoint(pos)
            if signum:
                bar.close()
                raise TrainingStopped(signum, pos.step)
    bar.close()


def pretrain(cfg: TrainConfig, batches: BatchSource, out_dir: str | Path, ctx: DistContext,
             resume: dict | None = None, pretraining_cases: dict | None = None,
             setup: TrainingSetup | None = None, store: str | Path | None = None) -> Position:
    """Run (or continue, from the checkpoint dict `resume`) pretraining to cfg.epochs.

    Writes out_dir/config.json, out_dir/metrics.jsonl, out_dir/checkpoints/last.pt (rank 0);
    `store` (the data's path) is recorded in the checkpoint for `--resume` without `--data`.
    Returns the final Position (its `history` holds this process's per-step loss values).
    SIGTERM or Ctrl-C: the current step finishes, last.pt is saved at that position and
    TrainingStopped is raised (tcsmae.stopping).
    """
    out_dir = Path(out_dir)
    if ctx.is_main:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", to_plain(cfg), indent=2)
    setup = setup or build_training(cfg, ctx)
    pos = restore(setup, resume, ctx) if resume is not None else Position()
    if resume is not None and resume.get("pretraining_cases"):
        pretraining_cases = resume["pretraining_cases"]
    log = MetricsLog(out_dir, ctx.is_main, resume_step=pos.step if resume is not None else None)
    n_steps = batches.steps_per_epoch if cfg.steps_per_epoch == 0 else min(cfg.steps_per_epoch,
                                                                            batches.steps_per_epoch)
    if n_steps < 1:
        raise UserError(f"an epoch has {batches.steps_per_epoch} batches of {cfg.batch_size} per rank: "
                        "the store is too small for this batch size and world size; lower --batch-size")

    def save(p: Position) -> None:
        payload = checkpoint_payload(setup, cfg, p, ctx, pretraining_cases,
                                     None if store is None else str(Path(store).resolve()))
        if payload is not None:
            save_checkpoint(out_dir / "checkpoints" / "last.pt", payload)
        barrier(ctx)

    try:
        with GracefulStop() as stop:
            while pos.epoch < cfg.epochs:
                if pos.step_in_epoch < n_steps:
                    train_one_epoch(setup, batches(pos.epoch, pos.step_in_epoch), n_steps, pos, cfg, ctx, log,
                                    save, stop)
                setup.scheduler.step()
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                save(pos)
                signum = stop.requested(ctx)
                if signum and pos.epoch < cfg.epochs:
                    raise TrainingStopped(signum, pos.step)
    finally:
        log.close()
    return pos
