"""Whole-volume segmentation: stored HU volume -> model input slices -> class map on the stored grid.

Used by online validation (`tcsmae finetune`) and by `tcsmae predict`. Forward: the
pipelines' NumPy reference (`preprocess_slice`, masking off); back: the logits are resized
to the padded square, cropped and turned into classes, since resampling logits rather than
labels keeps boundaries smooth on the stored grid. Step by step: docs/finetune.md,
"Whole-volume inference".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.reference import preprocess_slice
from tcsmae.pipelines.resize import square_padding


def model_input(hu: np.ndarray, cfg: PipelineConfig) -> np.ndarray:
    """One stored slice as the network sees it.

    hu: (Y, X) float32 HU. Returns (3, size, size) float32 in 0..1, channels (lung,
    mediastinal, edge); size = cfg.size.
    """
    assert cfg.size > 0, "whole-volume inference needs a fixed training size"
    no_mask = np.zeros(cfg.intervals, np.uint8)  # no interval chosen: M = 1
    return preprocess_slice(hu, no_mask, replace(cfg, masking="none"))["original"]


def logits_to_stored_grid(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Undo padding and resize.

    logits: (N, C, size, size) float. shape: stored (Y, X). Returns (N, C, Y, X) float32.
    """
    side = max(shape)
    x = logits.float()
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                          antialias=side < x.shape[-1])
    (top, _), (left, _) = square_padding(shape)
    return x[:, :, top:top + shape[0], left:left + shape[1]]


def classes_from_logits(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N, C, ...) logits -> (N, ...) int64 class index: C == 1 sigmoid > threshold, else argmax."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0]) > threshold).long()
    return logits.max(dim=1).indices  # same as argmax, several times faster on the CPU


def volume_input(hu, cfg: PipelineConfig) -> np.ndarray:
    """Every slice of a volume as the network sees it.

    hu: (Z, Y, X) HU (int16 or float32, or a zarr array). Returns (Z, 3, size, size) float32.
    """
    return np.stack([model_input(np.asarray(s, dtype=np.float32), cfg) for s in hu[:]])


@torch.no_grad()
def segment_inputs(model: torch.nn.Module, images: np.ndarray, shape: tuple[int, int],
                   device: torch.device | str = "cpu", batch_size: int = 16,
                   threshold: float = 0.5) -> np.ndarray:
    """Segment prepared slices and put the result on the stored grid.

    model: network mapping (B, 3, size, size) in 0..1 to logits (B, C, size, size), in eval
    mode. images: (Z, 3, size, size) float32 from `volume_input`. shape: stored (Y, X).
    Returns (Z, Y, X) uint8 class indices on the stored grid (0 = background).
    """
    y, x = shape
    out = np.zeros((len(images), y, x), np.uint8)
    for start in range(0, len(images), batch_size):
        block = torch.from_numpy(images[start:start + batch_size]).to(device)
        logits = logits_to_stored_grid(model(block), (y, x))  # (b, C, Y, X)
        out[start:start + len(block)] = classes_from_logits(logits, threshold).cpu().numpy()
    return out


def segment_volume(model: torch.nn.Module, hu, cfg: PipelineConfig,
                   device: torch.device | str = "cpu", batch_size: int = 16,
                   threshold: float = 0.5) -> np.ndarray:
    """Segment every slice of a stored volume.

    model: as in `segment_inputs`. hu: (Z, Y, X) HU (int16 or float32, or a zarr array).
    Returns (Z, Y, X) uint8 class indices on the stored grid (0 = background).
    """
    z_count, y, x = hu.shape
    out = np.zeros((z_count, y, x), np.uint8)
    for start in range(0, z_count, batch_size):
        images = volume_input(hu[start:start + batch_size], cfg)
        out[start:start + len(images)] = segment_inputs(model, images, (y, x), device, batch_size,
                                                        threshold)
    return out
