"""metrics.jsonl and TensorBoard of a pretraining run (rank 0 writes; the others hold a disabled log).

One JSON line per logged step: step, epoch, loss, loss_ssim, loss_con, temperature, lr,
pairs_per_s, skipped (and slices, the (case_index, z) of a skipped batch); non-finite
values are written as null. A resumed run drops the lines after its checkpoint's step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


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
        (first 4 slices; channels lung, mediastinal, edge shown as R, G, B; a missing one,
        None, is left out)."""
        if not self.enabled or self.tb is None or kept is None:
            return
        from torchvision.utils import make_grid

        rows = [t[:4].float().clamp(0, 1).cpu() for t in kept if t is not None]
        grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0])
        self.tb.add_image("pretrain/reconstructions", grid, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
