"""CT windows (paper Eq. 5): HU -> intensity in [0, 1].

    I = clip((HU - level + width / 2) / width, 0, 1)

The paper scales to 0..255; we keep 0..1 floats. Computed in float32 as
`(hu - (level - width / 2)) / width`, the same operation order as the GPU kernel, so the
paths agree bit for bit.
"""

from __future__ import annotations

import numpy as np


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Window HU to [0, 1].

    hu: (..., Y, X) float32 (or any real dtype), Hounsfield units.
    Returns the same shape, float32, 0..1.
    """
    low = np.float32(level - width / 2.0)
    out = (np.asarray(hu, dtype=np.float32) - low) / np.float32(width)
    return np.clip(out, np.float32(0.0), np.float32(1.0))


def lung_and_mediastinal(hu: np.ndarray, lung: tuple[float, float],
                         mediastinal: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Both windows of `hu` ((..., Y, X), HU); (level, width) pairs in HU. Two float32 arrays."""
    return window(hu, *lung), window(hu, *mediastinal)
