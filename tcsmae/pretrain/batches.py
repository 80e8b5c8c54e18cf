"""Batch sources of the pretraining loop: `batches(epoch, start_step)` -> iterable of dicts.

StoreBatches wraps the pipelines' loader (asked for the network's inputs ready, see
step.network_input_format); SyntheticBatches is an in-memory source for tests and benchmarks,
deterministic in (seed, epoch, step). Both give `original` (N, 3, S, S) float32 in 0..1 (the
SSIM target), `masked` (N, 3, S, S), `case_index`, `z` (N,) int64, and, when asked for the
network's format, `original_input`: `original` in the network's dtype and memory format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch

from tcsmae.pipelines.loader import make_loader
from tcsmae.pretrain.step import network_input_format


class BatchSource(Protocol):
    """What the engine trains on: batches per epoch per rank, and the batches from a position."""

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
    input_dtype: torch.dtype | None = None  # set: masked and original_input in this dtype ...
    channels_last: bool = False  # ... and memory format, as the loader hands them

    def batch(self, epoch: int, step: int) -> dict:
        g = torch.Generator().manual_seed(((self.seed * 1009 + epoch) * 1_000_003 + step) * 101 + self.rank)
        n, s = self.batch_size, self.size
        coarse = torch.rand(n, 3, max(s // 16, 1), max(s // 16, 1), generator=g)
        original = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        patches = (torch.rand(n, 1, max(s // 16, 1), max(s // 16, 1), generator=g) > 0.5).float()
        mask = torch.nn.functional.interpolate(patches, size=(s, s), mode="nearest")
        index = torch.arange(n, dtype=torch.int64) + (epoch * self.steps_per_epoch + step) * n
        out = {"original": original.to(self.device), "masked": (original * mask).to(self.device),
               "mask": mask.to(self.device), "case_index": index % 7, "z": index}
        if self.input_dtype is not None:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            out["masked"] = out["masked"].to(self.input_dtype, memory_format=fmt)
            out["original_input"] = out["original"].to(self.input_dtype, memory_format=fmt, copy=True)
        return out

    def __call__(self, epoch: int, start_step: int) -> Iterable[dict]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


class StoreBatches:
    """The pipelines' loader as an engine BatchSource: batches(epoch, start_step).

    One DALI loader is kept and moved to the next epoch with set_epoch; a new one is built
    only for a resume position it is not at."""

    def __init__(self, store_path: Path, cfg, ctx):
        dtype, channels_last = network_input_format(cfg, ctx.device)

        def make(epoch: int, step: int):
            loader = make_loader(
                store_path, cfg.pipeline, cfg.batch_size, device=ctx.device.type, rank=ctx.rank,
                world_size=ctx.world_size, epoch=epoch, step=step, num_threads=max(2, cfg.workers),
                py_workers=cfg.workers, device_id=ctx.device.index if ctx.device.type == "cuda" else None)
            loader.set_network_inputs(dtype, channels_last)
            return loader

        self._make = make
        self._loader = self._make(0, 0)
        self.steps_per_epoch = len(self._loader)

    def __call__(self, epoch: int, start_step: int):
        if self._loader.position != (epoch, start_step):
            if start_step == 0:
                self._loader.set_epoch(epoch)
            else:
                self._loader = self._make(epoch, start_step)
        return self._loader
