"""The settings of one `tcsmae bench` run (`BenchConfig`) and the pretraining config it measures."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tcsmae.errors import UserError
from tcsmae.pretrain.config import preset


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


def train_config(cfg: BenchConfig):
    """The pretraining config benchmarked: the paper preset (demo for --quick) with the
    bench's encoder, size, batch and workers."""

    base = preset("demo" if cfg.quick else "paper")
    return replace(base, model=replace(base.model, encoder=cfg.encoder),
                   pipeline=replace(base.pipeline, size=cfg.size),
                   batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device)

