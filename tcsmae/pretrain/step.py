"""One training step without a host sync: both branches, fp32 losses, backward, fused Adam.

    setup = build_training(cfg, ctx)        # model (DDP), the step's graph (compiled or not), Adam
    result = train_step(setup, batch, ctx)  # queues the step's work; result.stats stays on the device
    rows = read_steps([r1, r2, ...])        # the losses of many steps in one host read

A non-finite loss on any rank skips the update on the device: fused Adam takes the flag as
`found_inf` (parameters, moments and step count unchanged), buffers are put back with
torch.where (fp16 keeps GradScaler's own skip). `cfg.compile` compiles the forward and the
losses (and so their backward) into one graph of static shapes; on one GPU with CUDA graphs,
which copy the inputs into the graph's own buffers. Under DDP the graph breaks at DDP's call.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from tcsmae.distributed import DistContext
from tcsmae.pretrain.config import TrainConfig
from tcsmae.pretrain.losses import PretrainingLoss
from tcsmae.pretrain.model import TCSMAE

STAT_NAMES = ("loss", "loss_ssim", "loss_con", "temperature", "finite", "stop")
"""The entries of StepResult.stats, in order."""


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the network: 'auto' = bf16 on CUDA, none (fp32) on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def network_input_format(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype, bool]:
    """(dtype, channels_last) in which the network takes its inputs: the autocast dtype (float32
    without autocast) and cfg.channels_last. Batches already in it are used without a copy."""
    return amp_dtype(cfg.precision, device) or torch.float32, bool(cfg.channels_last)


def inductor_cache_dir() -> Path:
    """Where compiled kernels are kept between runs: $TORCHINDUCTOR_CACHE_DIR when set, else
    $TCSMAE_CACHE/inductor or ~/.cache/tcsmae/inductor (set as TORCHINDUCTOR_CACHE_DIR)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        root = Path(os.environ.get("TCSMAE_CACHE") or Path.home() / ".cache" / "tcsmae")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


class StepGraph(nn.Module):
    """The traced part of a step: `model(masked, original) -> PretrainOutput` under autocast,
    then `criterion(out, target) -> LossTerms` in float32.

    masked, original: (N, 3, S, S) network inputs in 0..1 (network dtype, memory format);
    target: (N, 3, S, S) float32 in 0..1, the SSIM target. Returns loss (scalar float32, to
    backpropagate), stats (4,) float32 detached: loss, loss_ssim, loss_con, temperature
    (1.0 without a learnable one), and recon_masked, recon_original (N, 3, S, S) float32."""

    def __init__(self, model: nn.Module, criterion: nn.Module, amp: torch.dtype | None, device_type: str):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.amp, self.device_type = amp, device_type

    def forward(self, masked: Tensor, original: Tensor, target: Tensor):
        with torch.autocast(self.device_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.model(masked, original)
        terms = self.criterion(out, target)
        temperature = (out.temperature.detach().float().reshape(()) if out.temperature is not None
                       else terms.loss.new_ones(()))
        stats = torch.stack([terms.loss.detach(), terms.loss_ssim.detach(), terms.loss_con.detach(),
                             temperature])
        return terms.loss, stats, out.recon_masked, out.recon_original


@dataclass
class TrainingSetup:
    """Everything that changes during training (what a checkpoint holds) and how a step runs."""

    model: nn.Module  # model(masked, original) -> PretrainOutput (maybe DDP-wrapped)
    core: TCSMAE  # the bare model (state dict, temperature)
    criterion: PretrainingLoss
    optimizer: torch.optim.Optimizer  # fused Adam (honours found_inf)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    channels_last: bool
    graph: nn.Module  # StepGraph around model and criterion, maybe torch.compile'd
    input_dtype: torch.dtype = torch.float32  # the network's input dtype (see network_input_format)
    compiled: bool = False
    cudagraphs: bool = False  # compiled with mode="reduce-overhead" (CUDA, one process)
    compile_seconds: float | None = None  # host time of the first compiled step (compilation included)
    buffers: list = field(default_factory=list)  # core's buffers (BatchNorm statistics) ...
    saved_buffers: list = field(default_factory=list)  # ... and their copies from before the step


def build_training(cfg: TrainConfig, ctx: DistContext, compile_backend: str = "inductor") -> TrainingSetup:
    """Model seeded from cfg.seed (identical on every rank), then per-rank RNG for drop-path.

    Adam is fused (one kernel; CPU and CUDA) at cfg.effective_lr(world size). With cfg.compile
    the step's graph is torch.compile'd with `compile_backend` (tests use "aot_eager", which
    traces the same forward and backward graphs without generating kernels), static shapes,
    and CUDA graphs (mode "reduce-overhead") when one CUDA process runs inductor."""
    torch.manual_seed(cfg.seed)
    core = TCSMAE.from_config(cfg).to(ctx.device)
    if cfg.channels_last:
        core = core.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed + ctx.rank)
    model: nn.Module = core
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(core, device_ids=device_ids)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.effective_lr(ctx.world_size), fused=True)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    amp = amp_dtype(cfg.precision, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp is torch.float16)
    criterion = PretrainingLoss(cfg.loss)
    graph: nn.Module = StepGraph(model, criterion, amp, ctx.device.type)
    cudagraphs = False
    if cfg.compile:
        inductor_cache_dir()
        cudagraphs = compile_backend == "inductor" and ctx.device.type == "cuda" and not ctx.distributed
        graph = torch.compile(graph, backend=compile_backend, dynamic=False,
                              mode="reduce-overhead" if cudagraphs else None)
    buffers = list(core.buffers())
    return TrainingSetup(model, core, criterion, optimizer, scheduler, scaler, amp, cfg.channels_last,
                         graph, input_dtype=network_input_format(cfg, ctx.device)[0],
                         compiled=bool(cfg.compile), cudagraphs=cudagraphs, buffers=buffers,
                         saved_buffers=[b.clone() for b in buffers])


def step_inputs(batch: dict, setup: TrainingSetup, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(masked, original, target) of a batch on `device`: the network's two inputs in its dtype
    and memory format, and `original` as float32 contiguous, the SSIM target.

    batch: `masked`, `original` (N, 3, S, S) in 0..1 and optionally `original_input`, the
    network's copy of `original`. Tensors already in the wanted dtype, layout and device are
    used as they are (the loader's network inputs, SyntheticBatches(input_dtype=...));
    others are converted here, one copy each."""
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    dtype = setup.input_dtype
    masked = batch["masked"].to(device, dtype, non_blocking=True, memory_format=fmt)
    target = batch["original"].to(device, torch.float32, non_blocking=True,
                                  memory_format=torch.contiguous_format)
    source = batch.get("original_input")
    original = (target if source is None else source).to(device, dtype, non_blocking=True, memory_format=fmt)
    return masked, original, target


@dataclass
class StepResult:
    """One step as queued on the device; nothing here has been read by the host.

    stats: (6,) float32 on the step's device, STAT_NAMES: loss, loss_ssim, loss_con (means
    over ranks), temperature, finite (1.0 = the update was applied), stop (> 0: a stop signal
    on some rank; DDP only). `read_steps` turns any number of them into floats at once."""

    stats: Tensor
    has_temperature: bool
    local_stop: int | None  # this process's stop signal as passed to train_step (host)
    distributed: bool
    output: tuple | None = None  # (masked, original, recon_masked, recon_original) detached, when asked for

    def read(self) -> "StepValues":
        """This step's values (one host sync)."""
        return read_steps([self])[0]


@dataclass
class StepValues:
    """A step's stats on the host."""

    values: dict  # loss, loss_ssim, loss_con (means over ranks), temperature (None without one): floats
    finite: bool  # False: the step was skipped on every rank
    stop_signum: int | None  # a stop signal pending on any rank (the same on every rank)


def read_steps(results: list[StepResult]) -> list[StepValues]:
    """The host values of `results` (steps on one device), in one device-to-host read."""
    if not results:
        return []
    rows = torch.stack([r.stats for r in results]).tolist()  # the one host sync
    out = []
    for r, (loss, loss_ssim, loss_con, t, finite, stop) in zip(results, rows, strict=True):
        if r.distributed:  # another rank's signal is named SIGTERM
            agreed = (r.local_stop or int(signal.SIGTERM)) if stop > 0 else None
        else:
            agreed = r.local_stop or None
        values = {"loss": loss, "loss_ssim": loss_ssim, "loss_con": loss_con,
                  "temperature": t if r.has_temperature else None}
        out.append(StepValues(values, finite > 0.5, agreed))
    return out


def train_step(setup: TrainingSetup, batch: dict, ctx: DistContext, keep_output: bool = False,
               stop_signum: int = 0) -> StepResult:
    """Forward both branches, fp32 losses, backward and (if finite on every rank) one update,
    all queued on the device: nothing is read back (see StepResult, read_steps).

    The skip decision is the same on every rank: it is taken from the loss means all-reduced
    across ranks (a NaN/inf on any rank makes them non-finite). stop_signum: this rank's
    pending stop signal (0: none, see tcsmae.stopping); under DDP it rides in the same
    all-reduce, so no step needs a collective of its own."""
    masked, original, target = step_inputs(batch, setup, ctx.device)
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.buffers:  # BatchNorm statistics: a skipped step must not move them
        torch._foreach_copy_(setup.saved_buffers, setup.buffers)
    first_compiled = setup.compiled and setup.compile_seconds is None
    started = time.perf_counter()
    if setup.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    loss, stats, recon_masked, recon_original = setup.graph(masked, original, target)
    setup.scaler.scale(loss).backward()  # always: DDP expects every rank's backward
    if first_compiled:  # compiling happens on the host, in the first forward and backward
        setup.compile_seconds = time.perf_counter() - started
    losses, temperature = stats[:3], stats[3:4]
    if ctx.distributed:  # mean over ranks; a stop signal on any rank makes its mean > 0
        shared = torch.cat([losses, losses.new_full((1,), float(stop_signum))])
        torch.distributed.all_reduce(shared)
        shared /= ctx.world_size
        losses, stop_any = shared[:3], shared[3:]
    else:
        stop_any = losses.new_zeros(1)
    finite = torch.isfinite(losses).all()
    if setup.scaler.is_enabled():  # fp16: the scaler skips non-finite gradients itself
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
    else:
        setup.optimizer.found_inf = (~finite).float()  # fused Adam: 1 = leave everything as it was
        try:
            setup.optimizer.step()
        finally:
            del setup.optimizer.found_inf
    if setup.core.temperature is not None:
        setup.core.temperature.clamp_()
    with torch.no_grad():
        for buf, saved in zip(setup.buffers, setup.saved_buffers, strict=True):
            buf.copy_(torch.where(finite, buf, saved))
    kept = None
    if keep_output:
        kept = tuple(None if t is None else t.detach()
                     for t in (masked, target, recon_masked, recon_original))
    result = torch.cat([losses.detach(), temperature, finite.float().reshape(1), stop_any])
    return StepResult(result, setup.core.temperature is not None, stop_signum or None, ctx.distributed, kept)
