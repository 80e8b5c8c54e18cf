"""Masks (paper Eq. 1-3) and the keyed random draws behind them.

Tissue mask: K equal HU intervals over [lo, hi] (`interval_index`, float64, pinned at exact
boundaries), floor(rho * K) of them drawn without replacement get M = 0. Patch mask (MAE
baseline): round(ratio * n_patches) patches get M = 0. Every draw comes from
`sample_rng(seed, epoch, slice_id, stream)`, never from DALI's generators, so the CPU and
GPU paths mask identically and a resumed run draws the same masks. Details:
docs/pipelines.md, "Masks and their random draws".
"""

from __future__ import annotations

import math

import numpy as np

STREAM_MASK = 0
"""Key suffix of the mask draw (interval choice or patch choice)."""
STREAM_AFFINE = 1
"""Key suffix of the augmentation draw."""


def sample_rng(seed: int, epoch: int, slice_id: int, stream: int = STREAM_MASK
               ) -> np.random.Generator:
    """Generator keyed by (seed, epoch, slice id, stream); slice_id = row of the slice index."""
    return np.random.default_rng([int(seed), int(epoch), int(slice_id), int(stream)])


def interval_index(hu: np.ndarray, lo: float, hi: float, k: int) -> np.ndarray:
    """Tissue interval of every pixel: hu (..., Y, X) HU -> same shape int64 in [0, K-1]."""
    scaled = (np.asarray(hu, dtype=np.float64) - float(lo)) * float(k) / (float(hi) - float(lo))
    return np.clip(np.floor(scaled), 0, k - 1).astype(np.int64)


def draw_intervals(rng: np.random.Generator, k: int, n_masked: int) -> np.ndarray:
    """Choose `n_masked` of `k` intervals without replacement -> (K,) uint8, 1 = masked."""
    chosen = np.zeros(k, dtype=np.uint8)
    chosen[rng.choice(k, size=n_masked, replace=False)] = 1
    return chosen


def tissue_mask(hu: np.ndarray, chosen: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """M of Eq. 2: hu (Y, X) HU, chosen (K,) uint8 -> (Y, X) float32, 0 in chosen intervals."""
    k = interval_index(hu, lo, hi, len(chosen))
    return (1 - np.asarray(chosen, dtype=np.uint8)[k]).astype(np.float32)


def patch_grid_shape(shape: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (GY, GX) covering an image of `shape` (Y, X); partial patches count."""
    return math.ceil(shape[0] / patch_size), math.ceil(shape[1] / patch_size)


def draw_patches(rng: np.random.Generator, grid_shape: tuple[int, int], ratio: float
                 ) -> np.ndarray:
    """Choose round(ratio * GY * GX) distinct patches -> (GY, GX) uint8, 1 = masked."""
    n = grid_shape[0] * grid_shape[1]
    grid = np.zeros(n, dtype=np.uint8)
    grid[rng.choice(n, size=int(round(ratio * n)), replace=False)] = 1
    return grid.reshape(grid_shape)


def patch_mask(grid: np.ndarray, patch_size: int, shape: tuple[int, int]) -> np.ndarray:
    """M of a patch draw: grid (GY, GX) uint8 -> (Y, X) float32, 0 inside masked patches."""
    ys = np.arange(shape[0]) // patch_size
    xs = np.arange(shape[1]) // patch_size
    return (1 - grid[ys[:, None], xs[None, :]]).astype(np.float32)


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """I_m = M * I_o: image (C, Y, X) float32, mask (Y, X) float32 -> (C, Y, X) float32."""
    return (image * mask[None]).astype(np.float32)
