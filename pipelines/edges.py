"""Edge channel (paper Eq. 6-9): Sobel gradient magnitude of both windows, their maximum.

    Gx = S_x * I,  Gy = S_y * I,  |G| = sqrt(Gx^2 + Gy^2),  E = max(|G_lung|, |G_mediastinal|)

with the true Sobel kernels (Eq. 7 prints S_y with a typo; we use S_y = S_x transposed).
Border: **numpy 'reflect'** (mirror about the edge pixel, which is not repeated:
`d c b | a b c d`), the same as scipy.ndimage mode='mirror' and OpenCV BORDER_REFLECT_101,
on every path (NumPy, CuPy, baseline). With it the derivative across the border is 0.
The magnitude of a 0..1 image reaches SOBEL_MAX = 4*sqrt(2) ~ 5.66; a fixed rule, never per
image, maps it to 0..1 (`edge_scaling`: 'clip' at `edge_clip`, default 1.0, or 'divide' by SOBEL_MAX).
"""

from __future__ import annotations

import numpy as np

from tcsmae.pipelines.config import SOBEL_MAX

SOBEL_X = np.array([[-1.0, 0.0, 1.0],
                    [-2.0, 0.0, 2.0],
                    [-1.0, 0.0, 1.0]])
"""S_x: derivative along x (columns), smoothing along y (rows)."""

SOBEL_Y = SOBEL_X.T.copy()
"""S_y = S_x transposed: derivative along y (rows)."""

BORDER = "reflect"
"""np.pad mode used on every path (== scipy.ndimage 'mirror')."""


def sobel_magnitude(image: np.ndarray) -> np.ndarray:
    """sqrt(Gx^2 + Gy^2) of one image, straight from the 3x3 correlation sums.

    image: (Y, X) float, any units (here a 0..1 window). Returns (Y, X) float64.
    Reference implementation (clear, not fast): nine shifted copies per kernel.
    """
    img = np.asarray(image, dtype=np.float64)
    padded = np.pad(img, 1, mode=BORDER)
    h, w = img.shape
    gx = np.zeros((h, w))
    gy = np.zeros((h, w))
    for dy in range(3):
        for dx in range(3):
            shifted = padded[dy:dy + h, dx:dx + w]      # pixel (y + dy - 1, x + dx - 1)
            gx += SOBEL_X[dy, dx] * shifted
            gy += SOBEL_Y[dy, dx] * shifted
    return np.sqrt(gx * gx + gy * gy)


def scale_edges(magnitude: np.ndarray, scaling: str, clip: float) -> np.ndarray:
    """Fixed map of a Sobel magnitude to 0..1: 'clip' -> min(m, clip); 'divide' -> m / SOBEL_MAX."""
    if scaling == "clip":
        return np.minimum(magnitude, clip)
    if scaling == "divide":
        return magnitude / SOBEL_MAX
    raise ValueError(f"unknown edge scaling {scaling!r}")


def edge_channel(lung: np.ndarray, mediastinal: np.ndarray, scaling: str = "clip",
                 clip: float = 1.0) -> np.ndarray:
    """E = scale(max(|G(lung)|, |G(mediastinal)|)).

    lung, mediastinal: (Y, X) float32 windows in 0..1. Returns (Y, X) float32 in 0..1.
    """
    magnitude = np.maximum(sobel_magnitude(lung), sobel_magnitude(mediastinal))
    return scale_edges(magnitude, scaling, clip).astype(np.float32)
