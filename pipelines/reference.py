"""The whole transform of one slice, composed from the reference steps (the spec).

Order (docs/pipelines.md, "Order of operations"): pad to square (when resizing) -> windows
-> edges -> resize (lung, mediastinal, edge, HU) -> mask from the resized HU -> I_m = M * I_o.
Augmentation is not part of the reference (it is a random warp of the HU before all this).
"""

from __future__ import annotations

import numpy as np

from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.edges import edge_channel
from tcsmae.pipelines.masking import apply_mask, patch_mask, tissue_mask
from tcsmae.pipelines.resize import pad_to_square, resize_bilinear
from tcsmae.pipelines.source import draw_mask
from tcsmae.pipelines.windowing import lung_and_mediastinal


def preprocess_slice(hu: np.ndarray, draw: np.ndarray, cfg: PipelineConfig) -> dict:
    """One slice through the reference.

    hu: (Y, X) float32 HU. draw: (K,) uint8 chosen intervals (tissue / none) or
    (GY, GX) uint8 masked patches (patch). Returns dict of float32 arrays:
    `hu` (H, W) HU on the output grid, `original` and `masked` (3, H, W) 0..1,
    `mask` (H, W) 0|1; H = W = cfg.size, or the stored (Y, X) when cfg.size == 0.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if cfg.size > 0:
        hu = pad_to_square(hu, cfg.pad_hu)
    lung, mediastinal = lung_and_mediastinal(hu, cfg.lung_window, cfg.mediastinal_window)
    edge = edge_channel(lung, mediastinal, cfg.edge_scaling, cfg.edge_clip)
    stack = np.stack([lung, mediastinal, edge, hu])                     # (4, Y, X)
    if cfg.size > 0:
        stack = resize_bilinear(stack, cfg.size)                        # (4, S, S)
    original, hu_out = stack[:3], stack[3]
    if cfg.masking == "patch":
        mask = patch_mask(draw, cfg.patch_size, hu_out.shape)
    else:  # 'none' draws no interval: M = 1 everywhere
        mask = tissue_mask(hu_out, draw, *cfg.hu_range)
    return {"hu": hu_out, "original": original, "masked": apply_mask(original, mask),
            "mask": mask}



def prepared_pair(store, slice_id: int, cfg):
    """(original, masked): (3, S, S) float32 in 0..1 of one slice, mask drawn as in training (epoch 0)."""

    case, z = int(store.slice_case[slice_id]), int(store.slice_z[slice_id])
    hu = store.read_slice(case, z)
    shape = (cfg.size, cfg.size) if cfg.size > 0 else hu.shape
    out = preprocess_slice(hu, draw_mask(cfg, 0, int(slice_id), shape), cfg)
    return out["original"], out["masked"]
