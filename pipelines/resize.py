"""Geometry to the training size: air padding to a square, then an antialiased resize.

Reference (the spec the fast paths match): torch's
`interpolate(mode="bilinear", antialias=True, align_corners=False)` for images and HU,
`interpolate(mode="nearest-exact")` for label maps (pixel-centre nearest neighbour, as
DALI's INTERP_NN). Non-square slices keep their aspect ratio: they are first padded, centred,
to a square of side max(Y, X) with air (-1024 HU; label 0), then resized square to square.
The padding happens before windowing and edges, so every channel sees the same image.
"""

from __future__ import annotations

import numpy as np


def square_padding(shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) rows/columns that centre a (Y, X) slice in a square."""
    y, x = shape
    side = max(y, x)
    top, left = (side - y) // 2, (side - x) // 2
    return (top, side - y - top), (left, side - x - left)


def pad_to_square(image: np.ndarray, fill: float) -> np.ndarray:
    """image: (Y, X) any dtype -> (S, S), S = max(Y, X), centred, padded with `fill`."""
    if image.shape[0] == image.shape[1]:
        return image
    return np.pad(image, square_padding(image.shape), mode="constant", constant_values=fill)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize (torch reference; also what the CPU path runs).

    image: (N, C, Y, X), (C, Y, X) or (Y, X) float32 -> same leading axes, (size, size)
    spatial, float32.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    lead = x.shape[:-2]
    x = x.reshape((-1, 1) + tuple(x.shape[-2:])) if x.ndim == 2 else x
    x = x[None] if x.ndim == 3 else x
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.reshape(tuple(lead) + (size, size)).numpy()


def resize_nearest(label: np.ndarray, size: int) -> np.ndarray:
    """Pixel-centre nearest neighbour: label (Y, X) integer -> (size, size) int64."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32))[None, None]
    out = F.interpolate(x, size=(size, size), mode="nearest-exact")
    return out[0, 0].numpy().astype(np.int64)
