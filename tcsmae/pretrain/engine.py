"""The pretraining loop: epochs of steps, checkpoints, metrics.jsonl.

    setup = build_training(cfg, ctx)                 # model (DDP), the step's graph, fused Adam
    pos = pretrain(cfg, batches, out_dir, ctx)       # epochs, checkpoints, metrics.jsonl

`batches` is a BatchSource (tcsmae.pretrain.batches): `batches(epoch, start_step)` yields
dicts with `original`, `masked` (N, 3, S, S) in 0..1, `case_index`, `z` (N,) int64 from batch
`start_step` of `epoch` on. Steps run without a host sync: the loss values are read every
`cfg.log_every` steps, at checkpoints and at an epoch's end, one read for all steps since
the last (non-finite steps are logged then, with their slices, and counted for the abort).
"""

from __future__ import annotations

import functools
import os
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
from tcsmae.pretrain.step import StepResult, TrainingSetup, build_training, read_steps, train_step
from tcsmae.stopping import GracefulStop, TrainingStopped


@dataclass
class Position:
    """Where training stands: `step` global steps done; next batch = (epoch, step_in_epoch)."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    nonfinite_in_a_row: int = 0
    history: list = field(default_factory=list)  # per-step loss values (for callers/tests)


@dataclass
class _Unread:
    """A step whose values the host has not read yet."""

    step: int
    epoch: int
    result: StepResult
    case_index: torch.Tensor  # (N,) int64, the batch's slices, for the line of a skipped step
    z: torch.Tensor
    queued_at: float  # time.perf_counter() when the step was queued


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
    (Longer than most functions here: `read_back` shares the loop's unread steps, position
    and throughput clock, which a module-level function would have to be handed each time.)

    The host reads the steps' values (one sync for all unread steps) every cfg.log_every
    steps, before a checkpoint and at the epoch's last step; metrics.jsonl gets a line for
    every logged step and every skipped (non-finite) step, in step order, and the
    consecutive-non-finite abort is checked then. When `stop` was signalled, saves a
    checkpoint after the step and raises TrainingStopped (at the epoch's last step the
    caller's end-of-epoch save does it): one process stops after the step that was running
    when the signal came; under DDP the signal travels in the step's all-reduce and the ranks act on it
    at the next read (every step with --log-every 1), so all stop after the same step.
    """
    from tqdm.auto import tqdm

    global_batch = cfg.batch_size * ctx.world_size
    lr = setup.optimizer.param_groups[0]["lr"]
    bar = tqdm(total=n_steps, initial=pos.step_in_epoch, desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
               disable=not ctx.is_main, unit="step", dynamic_ncols=True)
    tick, pairs_since = time.perf_counter(), 0
    unread: list[_Unread] = []

    def read_back() -> int | None:
        """Read and log the unread steps; the stop signal any of them carries (None: none)."""
        nonlocal tick, pairs_since
        rows = read_steps([u.result for u in unread])
        read_at = time.perf_counter()
        agreed = None
        for i, (u, row) in enumerate(zip(unread, rows)):
            pairs_since += global_batch
            slices = None
            if row.finite:
                pos.nonfinite_in_a_row = 0
            else:
                pos.nonfinite_in_a_row += 1
                slices = list(zip(u.case_index.tolist(), u.z.tolist()))
                if ctx.is_main:
                    tqdm.write(f"step {u.step}: non-finite loss {row.values['loss']}, step skipped; "
                               f"slices (case_index, z) on rank 0: {slices}")
            pos.history.append(row.values)
            if u.step % cfg.log_every == 0 or not row.finite:
                now = read_at if i == len(unread) - 1 else u.queued_at
                pairs_per_s = pairs_since / max(now - tick, 1e-9)
                tick, pairs_since = now, 0
                record = {"step": u.step, "epoch": u.epoch, **row.values, "lr": lr,
                          "pairs_per_s": pairs_per_s, "skipped": not row.finite}
                if not row.finite:
                    record["slices"] = slices
                log.write(record)
                bar.set_postfix(loss=f"{row.values['loss']:.4f}", l_ssim=f"{row.values['loss_ssim']:.4f}",
                                l_con=f"{row.values['loss_con']:.3f}",
                                T=f"{row.values['temperature'] or 0:.4f}", pairs_s=f"{pairs_per_s:.1f}")
            if pos.nonfinite_in_a_row >= cfg.max_nonfinite:
                unread.clear()
                raise UserError(f"{pos.nonfinite_in_a_row} non-finite losses in a row (last at step "
                                f"{u.step}): training diverged; lower --lr or check the data, then --resume "
                                "the last checkpoint")
            agreed = agreed or row.stop_signum
        unread.clear()
        return agreed

    it = iter(batches)
    while pos.step_in_epoch < n_steps:
        batch = next(it, None)
        if batch is None:
            raise UserError(f"the data ran out after {pos.step_in_epoch} of {n_steps} batches in epoch "
                            f"{pos.epoch}: lower --steps-per-epoch or check the store")
        want_images = cfg.image_every > 0 and (pos.step + 1) % cfg.image_every == 0 and ctx.is_main
        compiling = setup.compiled and setup.compile_seconds is None
        result = train_step(setup, batch, ctx, keep_output=want_images,
                            stop_signum=(stop.signum or 0) if stop is not None else 0)
        if compiling and ctx.is_main and setup.compile_seconds is not None:
            cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "the inductor cache")
            tqdm.write(f"compiled the training step in {setup.compile_seconds:.0f} s (the first step; "
                       f"kernels cached in {cache})")
        pos.step += 1
        pos.step_in_epoch += 1
        unread.append(_Unread(pos.step, pos.epoch, result, batch["case_index"], batch["z"],
                              time.perf_counter()))
        last = pos.step_in_epoch >= n_steps
        save_now = not last and bool(cfg.checkpoint_every) and pos.step % cfg.checkpoint_every == 0
        signum = None
        # one process: a signal that came during this step stops after it (no rank to agree with)
        late_stop = (stop.signum or None) if stop is not None and not ctx.distributed else None
        if last or save_now or pos.step % cfg.log_every == 0 or late_stop:
            signum = read_back() or late_stop
        if want_images:
            log.images(pos.step, result.output)
        result.output = None
        bar.update(1)
        if not last:
            if signum or save_now:
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
