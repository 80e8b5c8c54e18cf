"""TODO docstring."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import torch
from torch import nn

from tcsmae.distributed import DistContext
from tcsmae.pretrain.config import TrainConfig
from tcsmae.pretrain.losses import PretrainingLoss
from tcsmae.pretrain.model import TCSMAE


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the network: 'auto' = bf16 on CUDA, none (fp32) on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@dataclass
class TrainingSetup:
    """Everything that changes during training (what a checkpoint holds)."""

    model: nn.Module  # the module to call (maybe DDP- and/or compile-wrapped)
    core: TCSMAE  # the bare model (state dict, temperature)
    criterion: PretrainingLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    channels_last: bool


def build_training(cfg: TrainConfig, ctx: DistContext) -> TrainingSetup:
    """Model seeded from cfg.seed (identical on every rank), then per-rank RNG for drop-path."""
    torch.manual_seed(cfg.seed)
    core = TCSMAE.from_config(cfg).to(ctx.device)
    if cfg.channels_last:
        core = core.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed + ctx.rank)
    model: nn.Module = core
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(core, device_ids=device_ids)
    if cfg.compile:
        model = torch.compile(model)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=ctx.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    amp = amp_dtype(cfg.precision, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp is torch.float16)
    return TrainingSetup(model, core, PretrainingLoss(cfg.loss), optimizer, scheduler, scaler, amp,
                         cfg.channels_last)


def step_inputs(batch: dict, setup: TrainingSetup, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    masked = batch["masked"].to(device, torch.float32, non_blocking=True).contiguous(memory_format=fmt)
    original = batch["original"].to(device, torch.float32, non_blocking=True).contiguous(memory_format=fmt)
    return masked, original


@dataclass
class StepResult:
    values: dict  # loss, loss_ssim, loss_con (means over ranks), temperature: floats
    finite: bool
    output: object = None  # PretrainOutput (detached) when asked for
    stop_signum: int | None = None  # a stop signal pending on any rank (the same on every rank)


def train_step(setup: TrainingSetup, batch: dict, ctx: DistContext, keep_output: bool = False,
               stop_signum: int = 0) -> StepResult:
    """Forward both branches, fp32 losses, backward, and (if finite on every rank) one step.

    stop_signum: this rank's pending stop signal (0: none, see tcsmae.stopping). The ranks
    agree on it in the all-reduce of the losses, so no step needs a collective of its own."""
    masked, original = step_inputs(batch, setup, ctx.device)
    setup.optimizer.zero_grad(set_to_none=True)
    buffers = list(setup.core.buffers())
    saved = [b.clone() for b in buffers]  # BatchNorm statistics: a skipped step must not move them
    with torch.autocast(ctx.device.type, dtype=setup.amp or torch.float32, enabled=setup.amp is not None):
        out = setup.model(masked, original)
    terms = setup.criterion(out, original)  # fp32, outside autocast
    setup.scaler.scale(terms.loss).backward()  # always: DDP expects every rank's backward
    stats = torch.stack([terms.loss.detach(), terms.loss_ssim.detach(), terms.loss_con.detach(),
                         terms.loss.new_tensor(float(stop_signum)).detach()])
    if ctx.distributed:  # mean over ranks; a NaN/inf on any rank makes the mean non-finite
        torch.distributed.all_reduce(stats)  # and a stop signal on any rank makes its mean > 0
        stats /= ctx.world_size
    temperature = out.temperature.detach().reshape(1) if out.temperature is not None else stats.new_ones(1)
    loss, loss_ssim, loss_con, stop_any, t = torch.cat([stats, temperature.float()]).tolist()  # one host sync
    finite = all(math.isfinite(v) for v in (loss, loss_ssim, loss_con))  # same decision on every rank
    if finite:
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
        if setup.core.temperature is not None:
            setup.core.temperature.clamp_()
    else:
        setup.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(buffers, saved)
    values = {"loss": loss, "loss_ssim": loss_ssim, "loss_con": loss_con,
              "temperature": t if out.temperature is not None else None}
    kept = None
    if keep_output:
        kept = (masked.detach(), original.detach(), out.recon_masked.detach(), out.recon_original.detach())
    agreed = (stop_signum or int(signal.SIGTERM)) if stop_any > 0 else None  # another rank's: named SIGTERM
    return StepResult(values, finite, kept, agreed)
