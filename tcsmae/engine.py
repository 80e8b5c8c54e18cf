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
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from tcsmae.checkpoint import FORMAT, VERSION, capture_rng_state, restore_rng_state, save_checkpoint
from tcsmae.config import TrainConfig, to_plain
from tcsmae.distributed import DistContext, barrier
from tcsmae.atomic_files import write_json_atomic
from tcsmae.errors import UserError
from tcsmae.losses import PretrainingLoss
from tcsmae.model import TCSMAE
from tcsmae.stopping import GracefulStop, TrainingStopped


class BatchSource(Protocol):
    steps_per_epoch: int

    def __call__(self, epoch: int, start_step: int) -> Iterable[dict]: ...


@dataclass
class SyntheticBatches:
    """Deterministic in-memory pairs for tests and benchmarks: batch (epoch, step) is always
    the same. Smooth random 'anatomy' in 0..1, masked by random 16x16 patches (ratio 0.5)."""

    batch_size: int
    size: int
    steps_per_epoch: int
    seed: int = 0
    device: str | torch.device = "cpu"
    rank: int = 0

    def batch(self, epoch: int, step: int) -> dict:
        g = torch.Generator().manual_seed(((self.seed * 1009 + epoch) * 1_000_003 + step) * 101 + self.rank)
        n, s = self.batch_size, self.size
        coarse = torch.rand(n, 3, max(s // 16, 1), max(s // 16, 1), generator=g)
        original = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        patches = (torch.rand(n, 1, max(s // 16, 1), max(s // 16, 1), generator=g) > 0.5).float()
        mask = torch.nn.functional.interpolate(patches, size=(s, s), mode="nearest")
        index = torch.arange(n, dtype=torch.int64) + (epoch * self.steps_per_epoch + step) * n
        return {"original": original.to(self.device), "masked": (original * mask).to(self.device),
                "mask": mask.to(self.device), "case_index": index % 7, "z": index}

    def __call__(self, epoch: int, start_step: int) -> Iterable[dict]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


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


def _inputs(batch: dict, setup: TrainingSetup, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
    masked, original = _inputs(batch, setup, ctx.device)
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


class MetricsLog:
    """metrics.jsonl (appended; resumed runs continue it) + TensorBoard. Rank 0 only writes."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep training if it is broken
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (a crash after it)."""
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        if len(keep) != len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for key in ("loss", "loss_ssim", "loss_con", "temperature", "lr", "pairs_per_s"):
                if clean.get(key) is not None:
                    self.tb.add_scalar(f"pretrain/{key}", clean[key], record["step"])

    def images(self, step: int, kept) -> None:
        """TensorBoard grid: rows = masked input, original, recon of masked, recon of original
        (first 4 slices; channels lung, mediastinal, edge shown as R, G, B)."""
        if not self.enabled or self.tb is None or kept is None:
            return
        from torchvision.utils import make_grid

        rows = [t[:4].float().clamp(0, 1).cpu() for t in kept]
        grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0])
        self.tb.add_image("pretrain/reconstructions", grid, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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

    from tcsmae import __version__ as tcsmae_version

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


# Dense bf16 peak of known GPUs (datasheet figures, without sparsity), for MFU estimates;
# the first name contained in the device name wins, so "H100 PCIe" precedes "H100".
GPU_PEAK_BF16 = (("H100 PCIe", 756e12, "H100 PCIe dense bf16 756 TFLOP/s"),
                 ("H100", 989e12, "H100 SXM dense bf16 989 TFLOP/s"),
                 ("H200", 989e12, "H200 dense bf16 989 TFLOP/s"),
                 ("A100", 312e12, "A100 dense bf16 312 TFLOP/s"),
                 ("L40S", 362e12, "L40S dense bf16 362 TFLOP/s"),
                 ("B200", 2250e12, "B200 dense bf16 2250 TFLOP/s"))


def gpu_peak(name: str | None) -> tuple[float | None, str | None]:
    """(FLOP/s, description) of a GPU name's dense bf16 peak; (None, None) when unknown."""
    for key, flops, text in GPU_PEAK_BF16:
        if name and key in name:
            return flops, text
    return None, None


def _peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the device (for MFU); None when unknown (e.g. the CPU)."""
    if device.type != "cuda":
        return None
    return gpu_peak(torch.cuda.get_device_name(device))[0]


def measure_train_step(cfg: TrainConfig, device: str | torch.device, batch_size: int,
                       seconds: float = 10.0, warmup_steps: int = 3, profile: bool = False) -> dict:
    """Training-step throughput on in-memory synthetic batches at cfg.input_size.

    Runs `warmup_steps` steps (compilation included with cfg.compile), then as many as fit in
    `seconds`; `profile=True` also prints the top CUDA kernels of 3 steps. Returns
    {pairs_per_s, peak_mem_gb (GPU: max allocated; CPU: process peak RSS), mfu (None without a
    known GPU peak), flops_per_pair, steps, batch_size, device, precision}.
    """
    import resource
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from tcsmae.distributed import DistContext as _Ctx, resolve_device

    dev = resolve_device(str(device))
    cfg = replace(cfg, batch_size=batch_size, device=str(dev))
    ctx = _Ctx(rank=0, world_size=1, local_rank=0, device=dev)
    setup = build_training(cfg, ctx)
    source = SyntheticBatches(batch_size, cfg.input_size, steps_per_epoch=1, seed=cfg.seed, device=dev)
    batch = source.batch(0, 0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    masked, original = _inputs(batch, setup, dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=setup.amp or torch.float32, enabled=setup.amp is not None):
        with FlopCounterMode(display=False) as counter:  # forward of both branches, uncompiled
            setup.core(masked, original)
    # training = 3x the forward (PaLM's MFU convention); FlopCounterMode's own backward count
    # treats depthwise convolutions (MiT's Mix-FFN) as dense and overstates them ~200x.
    flops_per_step = 3.0 * float(counter.get_total_flops())
    for _ in range(warmup_steps):
        train_step(setup, batch, ctx)
    sync()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                train_step(setup, batch, ctx)
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    steps, start = 0, time.perf_counter()
    while True:
        train_step(setup, batch, ctx)
        steps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    pairs_per_s = steps * batch_size / elapsed
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)
    peak_flops = _peak_flops(dev)
    mfu = None if peak_flops is None else flops_per_step * steps / elapsed / peak_flops
    return {"pairs_per_s": pairs_per_s, "peak_mem_gb": peak, "mfu": mfu,
            "flops_per_pair": flops_per_step / batch_size, "steps": steps, "batch_size": batch_size,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "precision": str(setup.amp or torch.float32).replace("torch.", ""),
            "encoder": cfg.model.encoder, "size": cfg.input_size}
