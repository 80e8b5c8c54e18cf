"""`tcsmae pretrain`: TCS-MAE pretraining on a store (or on the embedded phantom default).

Configuration is layered: preset (default `paper`) -> device defaults (the step compiled on
CUDA) -> `--variant` -> `--objective` -> `--config FILE` -> explicit flags; with `--resume`
the checkpoint's configuration replaces the preset (input size and encoder stay). Under
torchrun `--batch-size` is per rank; the global batch and the lr in use (`--lr-scale`) are
printed at the start. Writes DIR/config.json, metrics.jsonl, checkpoints/last.pt and
tensorboard/.
"""

from __future__ import annotations

import os
from pathlib import Path

from tcsmae.case_digests import pretraining_case_digests
from tcsmae.checkpoint import check_resume_compatible, load_checkpoint
from tcsmae.distributed import broadcast_object, init_distributed, main_process_first, shutdown
from tcsmae.errors import UserError
from tcsmae.phantom.store import default_store
from tcsmae.pretrain.batches import StoreBatches
from tcsmae.pretrain.config import (
    OBJECTIVES,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config_file,
    objective_overrides,
    preset,
)
from tcsmae.pretrain.engine import pretrain
from tcsmae.pretrain.model import describe_mep_heads
from tcsmae.settings import add_flags, flag_overrides
from tcsmae.stopping import TrainingStopped

HELP = "pretrain the TCS-MAE U-Net (paired masked/original reconstruction + tissue contrast)"


def add_arguments(parser) -> None:
    """The flags that are not settings of the run, then one per TrainConfig field with a flag."""
    a = parser.add_argument
    a("--data", metavar="STORE.zarr", help="tcsmae store to pretrain on (default: the embedded phantom, "
      "built on first use in $TCSMAE_CACHE or ~/.cache/tcsmae)")
    a("--out", default=None, metavar="DIR",
      help="run folder (default: runs/pretrain; with --resume, the checkpoint's run folder)")
    a("--preset", choices=("paper", "demo"), default=None,
      help="paper = the paper's setup (default); demo = mit_b0, 128x128, a few hundred steps (CPU); "
      "ignored with --resume (the checkpoint's config is the base)")
    a("--variant", choices=("paper", "authors"), default=None,
      help="authors = the public code's loss: cosine-embedding x1000 on max-pooled heads of F3..F5, SSIM window 15")
    a("--config", metavar="FILE", help="JSON file of config overrides, nested like DIR/config.json")
    a("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. DIR/checkpoints/last.pt)")
    a("--objective", choices=OBJECTIVES, default=None,
      help="a named pretraining objective of the paper's tables: ae (no masking), mae (patch masking, masked "
      "branch only), patch-unmask, tcs-mae (the default); flags after it still apply (docs/method.md)")
    add_flags(parser, TrainConfig)


DEVICE_DEFAULTS = {"cuda": {"compile": True}}
"""Settings whose default depends on the device (before --variant, --config and flags)."""

VARIANTS = {
    "paper": {},
    "authors": {"model": {"projection": "maxpool", "mep_levels": [3, 4, 5]},
                "loss": {"contrastive": "cosine", "ssim_window": 15}},
}


def build_config(args, stored: dict | None = None, device_defaults: dict | None = None):
    """TrainConfig from preset/stored config, device defaults, variant, --config file and flags
    (in that order). device_defaults: overrides of the device (e.g. {"compile": True} on CUDA),
    applied to a preset only, not to a stored config."""

    cfg = config_from_dict(stored) if stored is not None else preset(args.preset or "paper")
    if device_defaults and stored is None:
        cfg = apply_overrides(cfg, device_defaults, where="device defaults")
    if args.variant:
        cfg = apply_overrides(cfg, VARIANTS[args.variant], where=f"--variant {args.variant}")
    if getattr(args, "objective", None):
        cfg = apply_overrides(cfg, objective_overrides(args.objective), where=f"--objective {args.objective}")
    if args.config:
        cfg = load_config_file(args.config, cfg)
    return apply_overrides(cfg, flag_overrides(args, TrainConfig), where="command-line flags")


def resume_out_dir(out: str | None, resume: str | None) -> Path:
    """--out, else the run folder of a --resume checkpoint (RUN/checkpoints/X.pt), else runs/pretrain."""
    if out:
        return Path(out)
    if resume and Path(resume).resolve().parent.name == "checkpoints":
        return Path(resume).resolve().parent.parent
    return Path("runs/pretrain")


def run(args) -> int:

    ckpt = load_checkpoint(args.resume) if args.resume else None
    cfg = build_config(args, stored=ckpt["config"] if ckpt else None)
    if ckpt is not None:
        check_resume_compatible(ckpt, args.resume, cfg.input_size, cfg.model.encoder)
    out = resume_out_dir(args.out, args.resume)
    ctx = init_distributed(cfg.device)
    if ctx.device.type == "cuda" and ckpt is None:  # the compiled step is the CUDA default
        cfg = build_config(args, device_defaults=DEVICE_DEFAULTS["cuda"])
    say = print if ctx.is_main else (lambda *a, **k: None)
    try:
        if args.data:
            store = Path(args.data)
        elif ckpt is not None and ckpt.get("store"):
            store = Path(ckpt["store"])
            say(f"resuming on the checkpoint's data {store} (pass --data to use another copy)")
        else:
            with main_process_first(ctx):
                store = default_store(ctx.is_main, say)
        if not store.exists():
            raise UserError(f"--data {store} does not exist: convert DICOM first (tcsmae convert ... -o {store})")
        cases = pretraining_case_digests(store) if ctx.is_main and ckpt is None else None
        cases = broadcast_object(cases, ctx)
        batches = StoreBatches(store, cfg, ctx)
        say(start_summary(cfg, ctx, store, batches.steps_per_epoch, asked_steps=args.steps_per_epoch))
        last = out / "checkpoints" / "last.pt"
        if ckpt is not None:
            done_epochs = ckpt["data_position"]["epoch"]
            if done_epochs >= cfg.epochs:
                say(f"{args.resume} has finished all {done_epochs} epochs: nothing to do; to train longer "
                    f"pass a larger --epochs, e.g. --epochs {done_epochs + 10}")
                return 0
            say(f"resuming from {args.resume} after step {ckpt['step']}: epoch {done_epochs + 1}/{cfg.epochs}, "
                f"batch {ckpt['data_position']['step'] + 1}")
            note = world_size_note(ckpt.get("world_size"), ctx.world_size, cfg.batch_size,
                                   ckpt["data_position"]["step"] > 0)
            if note:
                say(note)
        try:
            pos = pretrain(cfg, batches, out, ctx, resume=ckpt, pretraining_cases=cases, store=store)
        except TrainingStopped as stopped:
            launcher = ("the same torchrun command with -m tcsmae.cli pretrain" if "TORCHELASTIC_RUN_ID" in os.environ
                        else "tcsmae pretrain")
            say(f"{stopped}; checkpoint {last}: continue with {launcher} --resume {last}")
            return 128 + stopped.signum
        say(f"done: {pos.step} steps, {pos.epoch} epochs; checkpoint {last}")
    finally:
        shutdown(ctx)
    return 0


def world_size_note(saved: int | None, now: int, batch_size: int, mid_epoch: bool) -> str | None:
    """A warning when a checkpoint of `saved` ranks resumes on `now` ranks: the run goes on,
    but not as the uninterrupted one would have."""
    if saved is None or saved == now:
        return None
    return (f"note: the checkpoint was written by {saved} rank(s) and this run has {now}: the global batch "
            f"changes from {saved * batch_size} to {now * batch_size} (the learning rate is not rescaled), the "
            "random state restarts"
            + (", and the rest of this epoch is sharded anew, so some of its slices are seen twice or not at all"
               if mid_epoch else "")
            + f"; resume on {saved} rank(s) to continue exactly")


def start_summary(cfg, ctx, store: Path, batches_per_epoch: int, asked_steps: int | None = None) -> str:
    """The run's settings in one paragraph, with notes on settings that surprise
    (`asked_steps`: --steps-per-epoch as given on the command line, None when not given)."""
    n = cfg.steps_per_epoch
    global_batch = cfg.batch_size * ctx.world_size
    lr = cfg.effective_lr(ctx.world_size)
    scaled = (f"--lr {cfg.lr} at batch {cfg.REFERENCE_BATCH}, {cfg.lr_scale} in the global batch"
              if cfg.lr_scale != "none" else "not scaled with the batch")
    text = (f"pretraining {cfg.model.encoder} at {cfg.input_size}x{cfg.input_size} on {store}: "
            f"{ctx.world_size} rank(s) on {ctx.device}, global batch {global_batch} "
            f"({cfg.batch_size} per rank), effective lr {lr:.4g} ({scaled}; gamma {cfg.lr_gamma}/epoch), "
            f"{'compiled' if cfg.compile else 'eager'} step, masking "
            f"{cfg.pipeline.masking}, MEP levels {['F%d' % v for v in cfg.model.mep_levels] or 'none'}, "
            f"{cfg.epochs} epoch(s) of {min(n, batches_per_epoch) if n else batches_per_epoch} step(s); "
            f"the store gives {batches_per_epoch} batch(es) per epoch per rank")
    text += "\n" + describe_mep_heads(cfg.model, cfg.input_size)
    if asked_steps is not None and asked_steps > batches_per_epoch:
        text += f"\nnote: --steps-per-epoch {asked_steps} is more than that: an epoch stops after {batches_per_epoch}"
    if ctx.device.type == "cpu" and (cfg.input_size >= 256 or cfg.model.encoder != "mit_b0"):
        text += ("\nnote: this is the full-size configuration on the CPU, tens of seconds per step; "
                 "for a try use --preset demo (mit_b0, 128x128), for real runs a GPU")
    return text
