"""The settings of one `tcsmae bench` run (`BenchConfig`) and the pretraining config it measures."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from tcsmae.pretrain.config import preset
from tcsmae.settings import flag, invalid


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; `asdict` goes into the result file. Fields with `flag(...)` metadata
    are `tcsmae bench`'s flags, their docstrings its help (the command's defaults depend on
    the device and --quick, so each docstring gives them)."""

    data: str | None = field(default=None, metadata=flag("--data", metavar="STORE.zarr"))
    """tcsmae store (default: phantom chest CT at 512x512, built once in $TCSMAE_CACHE or
    ~/.cache/tcsmae)."""
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata=flag("--device"))
    """Where train_step, end_to_end and dali_gpu run (default: cuda when available, else cpu)."""
    workers: int = field(default=2, metadata=flag("--workers", metavar="W"))
    """Baseline DataLoader workers = DALI CPU threads = read-stage processes; the end-to-end
    loader gets W threads and W/2 reader processes (default: CPU count)."""
    batch_size: int = field(default=30, metadata=flag("--batch-size", metavar="N"))
    """Slices per batch in every stage (default: 30 on cuda, the paper's training batch; 8 on
    cpu and with --quick)."""
    size: int = field(default=256, metadata=flag("--size", metavar="PX"))
    """Output side in pixels (default 256, the paper's; --quick 128)."""
    seconds: float = field(default=10.0, metadata=flag("--seconds", metavar="S"))
    """Timed seconds per stage measurement, after warm-up; every stage is capped by it
    (default 10; --quick 2)."""
    encoder: str = field(default="mit_b2", metadata=flag("--encoder"))
    """smp encoder of the trained U-Net (default mit_b2, the paper's; --quick mit_b0)."""
    quick: bool = False
    """The demo preset was asked for (mit_b0, 128x128, batch 8, 2 s per stage)."""
    pool_slices: int = field(default=256, metadata=flag("--pool-slices", metavar="N"))
    """Distinct slices held in memory for the preprocess stage, cycled (default 256; --quick 32)."""
    batch_sweep: tuple[int, ...] = field(default=(), metadata=flag("--batch-sweep", metavar="N"))
    """Extra train_step batch sizes to try for the best one (default on a GPU: 30 64 128; none
    on the CPU)."""
    compile: bool = field(default=False, metadata=flag("--compile"))
    """torch.compile the training step as `tcsmae pretrain --compile` does (default: on with
    cuda, off on the CPU); every batch size compiles once (kernels cached between runs)."""
    profile: bool = field(default=False, metadata=flag("--profile"))
    """Profile 3 training steps: a torch profiler trace beside --out (FILE.trace.json, for
    chrome://tracing or Perfetto) and the top-20 kernels (self CUDA time; self CPU time on the
    CPU) in the result and printed."""
    gpu_preprocess_batch: int = 256
    """dali_gpu is also timed at this batch (GPU only): per-batch overheads hide at 30."""
    phantom_cases: int = 16
    """Phantom cases written when --data is not given."""
    phantom_slices: int = 32
    """Slices per phantom case (512x512 each)."""

    def __post_init__(self):
        cls = type(self)
        if self.device not in ("cpu", "cuda"):
            raise invalid(cls, "device", self.device, "choose cpu or cuda")
        for name in ("workers", "batch_size", "pool_slices", "phantom_cases", "phantom_slices",
                     "gpu_preprocess_batch"):
            if getattr(self, name) < 1:
                raise invalid(cls, name, getattr(self, name), "must be >= 1")
        if self.size < 32 or self.size % 32:
            raise invalid(cls, "size", self.size, "use a multiple of 32 (the U-Net downsamples 5 times), "
                          "e.g. 256 (paper) or 128 (quick)")
        if not self.seconds > 0:
            raise invalid(cls, "seconds", self.seconds, "must be > 0")
        if any(b < 1 for b in self.batch_sweep):
            raise invalid(cls, "batch_sweep", self.batch_sweep, "batch sizes must be >= 1")


def train_config(cfg: BenchConfig):
    """The pretraining config benchmarked: the paper preset (demo for --quick) with the
    bench's encoder, size, batch, workers and compile setting."""

    base = preset("demo" if cfg.quick else "paper")
    return replace(base, model=replace(base.model, encoder=cfg.encoder),
                   pipeline=replace(base.pipeline, size=cfg.size),
                   batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device, compile=cfg.compile)

