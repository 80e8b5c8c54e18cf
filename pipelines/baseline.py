"""The baseline a user would otherwise write: a torch Dataset doing the same steps per slice
with NumPy/SciPy (and torch's antialiased resize), fed through a plain DataLoader with W
worker processes. The preprocessing benchmark (tcsmae/bench/preprocess.py) uses it as the
yardstick; it is tested to give the same outputs as the reference.
"""

from __future__ import annotations

import numpy as np

from tcsmae.pipelines.config import SOBEL_MAX, PipelineConfig
from tcsmae.pipelines.masking import interval_index, patch_mask
from tcsmae.pipelines.resize import pad_to_square


class BaselineDataset:
    """torch-style Dataset over in-memory HU slices.

    slices: (S, Y, X) int16|float32 HU. draws: per-slice mask draws, (S, K) uint8 (tissue /
    none) or (S, GY, GX) uint8 (patch). Item i -> (original (3, H, W), masked (3, H, W),
    mask (1, H, W)) float32 torch tensors.
    """

    def __init__(self, slices: np.ndarray, draws: np.ndarray, cfg: PipelineConfig):
        self.slices = slices
        self.draws = draws
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int):
        import scipy.ndimage as ndi
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        hu = self.slices[i].astype(np.float32)
        if cfg.size > 0:
            hu = pad_to_square(hu, cfg.pad_hu)
        windows = []
        for level, width in (cfg.lung_window, cfg.mediastinal_window):
            windows.append(np.clip((hu - np.float32(level - width / 2)) / np.float32(width),
                                   0, 1).astype(np.float32))
        # scipy 'mirror' == numpy 'reflect' (edges.py)
        edge = np.maximum(*(np.hypot(ndi.sobel(w, axis=1, mode="mirror"),
                                     ndi.sobel(w, axis=0, mode="mirror")) for w in windows))
        edge = np.minimum(edge, cfg.edge_clip) if cfg.edge_scaling == "clip" \
            else edge / SOBEL_MAX
        stack = torch.from_numpy(np.stack([windows[0], windows[1], edge, hu]))
        if cfg.size > 0:
            stack = F.interpolate(stack[None], size=(cfg.size, cfg.size), mode="bilinear",
                                  antialias=True, align_corners=False)[0]
        original = stack[:3]
        if cfg.masking == "patch":
            mask = patch_mask(self.draws[i], cfg.patch_size, tuple(stack.shape[1:]))
        else:
            k = interval_index(stack[3].numpy(), *cfg.hu_range, cfg.intervals)
            mask = (1 - self.draws[i][k]).astype(np.float32)
        mask = torch.from_numpy(mask)[None]
        return original, original * mask, mask


def baseline_loader(slices: np.ndarray, draws: np.ndarray, cfg: PipelineConfig,
                    batch_size: int, workers: int):
    """Plain torch DataLoader (W worker processes, persistent) over BaselineDataset."""
    import torch

    return torch.utils.data.DataLoader(
        BaselineDataset(slices, draws, cfg), batch_size=batch_size, shuffle=False,
        num_workers=workers, persistent_workers=workers > 0, drop_last=True,
        prefetch_factor=2 if workers > 0 else None)
