"""The reference pipeline against independent implementations, not restatements of it:
Sobel against scipy.ndimage.sobel (mode "mirror") per 2-D image, and the whole transform of
real CT slices at 256 px against a NumPy/SciPy/torch re-implementation written from
method-notes (windows, Sobel via SciPy, edge clip, torch antialiased resize, interval index
floor((hu - lo) * K / (hi - lo)) clipped, M applied to all three channels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.edges import sobel_magnitude
from tcsmae.pipelines.reference import preprocess_slice


def scipy_sobel_magnitude(image: np.ndarray) -> np.ndarray:
    """sqrt(Gx^2 + Gy^2) from scipy.ndimage.sobel, mirror borders (reflect without the edge pixel)."""
    img = np.asarray(image, dtype=np.float64)
    gx = ndimage.sobel(img, axis=1, mode="mirror")  # d/dx (columns), smoothed along y
    gy = ndimage.sobel(img, axis=0, mode="mirror")
    return np.hypot(gx, gy)


@pytest.mark.parametrize("shape", [(5, 7), (32, 32), (48, 40)])
def test_sobel_matches_scipy_on_random_images(shape):
    rng = np.random.default_rng(sum(shape))
    for image in (rng.random(shape), (rng.random(shape) > 0.5).astype(np.float64)):
        np.testing.assert_allclose(sobel_magnitude(image), scipy_sobel_magnitude(image), rtol=0, atol=1e-12)


def test_sobel_matches_scipy_on_real_windows(real_hu):
    for hu in real_hu:
        for level, width in ((-500.0, 1200.0), (30.0, 300.0)):
            image = np.clip((hu.astype(np.float64) - level + width / 2) / width, 0, 1)
            np.testing.assert_allclose(sobel_magnitude(image), scipy_sobel_magnitude(image), rtol=0, atol=1e-9)


def method_notes_slice(hu: np.ndarray, chosen: list[int], size: int = 256, k: int = 8,
                       lo: float = -1000.0, hi: float = 500.0) -> dict:
    """One slice as method-notes describe it: pad to a centred square with -1024 HU, windows
    and edges at the stored resolution, antialiased bilinear resize (torch) of the three
    channels and of the HU, the mask from the resized HU, I_m = M * I_o."""
    hu = np.asarray(hu, dtype=np.float64)
    y, x = hu.shape
    s = max(y, x)
    square = np.full((s, s), -1024.0)
    top, left = (s - y) // 2, (s - x) // 2
    square[top:top + y, left:left + x] = hu
    lung = np.clip((square - (-500.0) + 1200.0 / 2) / 1200.0, 0, 1)
    mediastinal = np.clip((square - 30.0 + 300.0 / 2) / 300.0, 0, 1)
    edge = np.minimum(np.maximum(scipy_sobel_magnitude(lung), scipy_sobel_magnitude(mediastinal)), 1.0)
    stack = torch.from_numpy(np.stack([lung, mediastinal, edge, square]))[None]  # float64
    resized = F.interpolate(stack, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    original, hu_out = resized[:3], resized[3]
    interval = np.clip(np.floor((hu_out - lo) * k / (hi - lo)), 0, k - 1).astype(int)
    mask = np.where(np.isin(interval, chosen), 0.0, 1.0)
    return {"original": original, "masked": original * mask[None], "mask": mask, "hu": hu_out,
            "scaled": (hu_out - lo) * k / (hi - lo)}


@pytest.mark.parametrize("crop", [None, (slice(0, 512), slice(32, 480))])  # square, and 512 x 448
def test_full_pipeline_at_256_matches_method_notes_on_real_slices(real_hu, crop):
    cfg = PipelineConfig(size=256)
    chosen = [1, 3, 4, 6, 7, 0]  # floor(0.75 * 8) = 6 intervals
    draw = np.zeros(8, dtype=np.uint8)
    draw[chosen] = 1
    for hu in real_hu:
        hu = hu if crop is None else hu[crop]
        got = preprocess_slice(hu, draw, cfg)
        want = method_notes_slice(hu, chosen)
        assert got["original"].shape == (3, 256, 256) and got["original"].dtype == np.float32
        np.testing.assert_allclose(got["original"], want["original"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(got["hu"], want["hu"], rtol=0, atol=0.05)  # HU, float32 resize
        # the mask may differ only where the resized HU sits on an interval boundary
        clear = np.abs(want["scaled"] - np.round(want["scaled"])) > 1e-3
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(got["mask"][clear], want["mask"][clear])
        assert 0.05 < (got["mask"] == 0).mean() < 0.95  # real slices: some pixels masked, not all
        np.testing.assert_allclose(got["masked"][:, clear], want["masked"][:, clear], rtol=0, atol=2e-5)
        assert np.all(got["masked"][:, got["mask"] == 0] == 0)  # masked pixels exactly 0
