"""Each reference step against values computed by hand (one tiny array per equation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tcsmae.errors import UserError
from tcsmae.pipelines import edges, masking, resize, windowing
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.reference import preprocess_slice


# ---------------------------------------------------------------- Eq. 5: windows
@pytest.mark.parametrize("hu, expected", [
    (-1100.0, 0.0), (-1200.0, 0.0), (-500.0, 0.5), (-800.0, 0.25), (100.0, 1.0), (700.0, 1.0),
])
def test_lung_window_values(hu, expected):
    # l = -500, w = 1200: I = clip((HU + 500 + 600) / 1200, 0, 1)
    assert windowing.window(np.array([hu], np.float32), -500, 1200)[0] == pytest.approx(expected)


@pytest.mark.parametrize("hu, expected", [
    (-120.0, 0.0), (-1000.0, 0.0), (30.0, 0.5), (105.0, 0.75), (180.0, 1.0), (400.0, 1.0),
])
def test_mediastinal_window_values(hu, expected):
    assert windowing.window(np.array([hu], np.float32), 30, 300)[0] == pytest.approx(expected)


def test_window_dtype_and_shape():
    out = windowing.window(np.zeros((2, 3, 4), np.int16), 30, 300)
    assert out.dtype == np.float32 and out.shape == (2, 3, 4)


# ---------------------------------------------------------------- Eq. 6-9: Sobel edges
def test_sobel_kernels_are_true_sobel():
    assert np.array_equal(edges.SOBEL_X, [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    assert np.array_equal(edges.SOBEL_Y, edges.SOBEL_X.T)
    assert edges.SOBEL_Y.sum() == 0  # Eq. 7's misprinted row [-1, -2, 1] would not sum to 0


def test_sobel_vertical_step_by_hand():
    # columns 0 0 1 1: interior columns see a step of 1 -> Gx = 1 + 2 + 1 = 4, Gy = 0.
    # Border columns with 'reflect' (col -1 := col 1, col 4 := col 2): 0 0 0 and 1 1 1 -> 0.
    img = np.tile([0.0, 0.0, 1.0, 1.0], (4, 1))
    expected = np.tile([0.0, 4.0, 4.0, 0.0], (4, 1))
    np.testing.assert_allclose(edges.sobel_magnitude(img), expected)


def test_sobel_horizontal_step_uses_transposed_kernel():
    img = np.tile([0.0, 0.0, 1.0, 1.0], (4, 1)).T
    expected = np.tile([0.0, 4.0, 4.0, 0.0], (4, 1)).T
    np.testing.assert_allclose(edges.sobel_magnitude(img), expected)


def test_sobel_ramp_magnitude():
    # I = a x + b y: Gx = 8a, Gy = 8b in the interior -> |G| = 8 sqrt(a^2 + b^2)
    a, b = 0.01, 0.02
    yy, xx = np.mgrid[:6, :7]
    mag = edges.sobel_magnitude(a * xx + b * yy)
    np.testing.assert_allclose(mag[1:-1, 1:-1], 8 * math.hypot(a, b), rtol=1e-12)
    # on the left/right border Gx vanishes under 'reflect', Gy stays 8b
    np.testing.assert_allclose(mag[1:-1, 0], 8 * b, rtol=1e-12)


def test_sobel_reflect_is_numpy_reflect_not_symmetric():
    # a single bright corner pixel: 'reflect' mirrors it away from (0, 1); 'symmetric' would not
    img = np.zeros((4, 4))
    img[0, 0] = 1.0
    mag = edges.sobel_magnitude(img)
    # at (0, 1): rows -1 := 1 (zeros) -> Gx = -(2 * 1) (centre row, left column) = -2, Gy = 0
    assert mag[0, 1] == pytest.approx(2.0)
    # at (0, 0): left column := column 1 (0), right column 1 (0) -> Gx = 0; Gy = 0
    assert mag[0, 0] == pytest.approx(0.0)


def test_edge_channel_max_and_scaling():
    lung = np.tile([0.0, 0.0, 0.1, 0.1], (4, 1)).astype(np.float32)        # |G| = 0.4
    med = np.tile([0.0, 0.0, 0.5, 0.5], (4, 1)).T.astype(np.float32)       # |G| = 2.0
    clip = edges.edge_channel(lung, med, "clip", 1.0)
    assert clip.dtype == np.float32
    np.testing.assert_allclose(clip[1, 1], 1.0)                  # max(0.4, 2.0) clipped
    np.testing.assert_allclose(clip[0, 1], 0.4, rtol=1e-6)       # only the lung edge there
    divide = edges.edge_channel(lung, med, "divide", 1.0)
    np.testing.assert_allclose(divide[1, 1], 2.0 / (4 * math.sqrt(2)), rtol=1e-6)


# ---------------------------------------------------------------- Eq. 1-3: tissue mask
def test_interval_index_pinned_formula_k8():
    hu = np.array([-2000, -1000, -812.6, -812.5, -0.5, 0, 312.5, 499.9, 500, 3000])
    # width 187.5 HU: boundaries at -812.5, -625, ..., 312.5
    expected = [0, 0, 0, 1, 5, 5, 7, 7, 7, 7]
    assert masking.interval_index(hu, -1000, 500, 8).tolist() == expected


def test_interval_index_exact_boundaries_k6():
    # K = 6 puts the boundaries on integer HU: -750, -500, -250, 0, 250 start intervals 1..5
    bounds = np.array([-750.0, -500.0, -250.0, 0.0, 250.0], dtype=np.float32)
    assert masking.interval_index(bounds, -1000, 500, 6).tolist() == [1, 2, 3, 4, 5]
    just_below = bounds - np.float32(0.5)
    assert masking.interval_index(just_below, -1000, 500, 6).tolist() == [0, 1, 2, 3, 4]


def test_tissue_mask_by_hand():
    hu = np.array([[-1000.0, -700.0], [40.0, 400.0]])    # intervals 0, 1, 5, 7
    chosen = np.array([0, 1, 0, 0, 0, 1, 0, 1], np.uint8)
    assert masking.tissue_mask(hu, chosen, -1000, 500).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_draw_intervals_count_and_keying():
    rng = masking.sample_rng(3, 1, 17)
    chosen = masking.draw_intervals(rng, 8, 6)
    assert chosen.dtype == np.uint8 and chosen.sum() == 6 and set(chosen.tolist()) <= {0, 1}
    again = masking.draw_intervals(masking.sample_rng(3, 1, 17), 8, 6)
    assert np.array_equal(chosen, again)


def test_patch_mask_by_hand():
    grid = np.array([[1, 0], [0, 1]], np.uint8)
    mask = masking.patch_mask(grid, 2, (3, 4))               # partial last patch row
    expected = [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]]
    assert mask.tolist() == expected


def test_draw_patches_ratio():
    grid = masking.draw_patches(masking.sample_rng(0, 0, 0), (16, 16), 0.75)
    assert grid.shape == (16, 16) and grid.sum() == 192


def test_apply_mask_all_channels():
    image = np.arange(12, dtype=np.float32).reshape(3, 2, 2) / 12
    mask = np.array([[1, 0], [0, 1]], np.float32)
    out = masking.apply_mask(image, mask)
    assert np.array_equal(out[:, 0, 1], [0, 0, 0]) and np.array_equal(out[:, 0, 0], image[:, 0, 0])


# ---------------------------------------------------------------- geometry
def test_pad_to_square_centres_and_fills():
    img = np.ones((2, 5), np.float32)
    out = resize.pad_to_square(img, -1024)
    assert out.shape == (5, 5)
    # (5 - 2) // 2 = 1 row on top, 2 at the bottom
    assert out[0].tolist() == [-1024] * 5 and out[1].tolist() == [1] * 5
    assert out[3:].tolist() == [[-1024] * 5] * 2


def test_resize_bilinear_antialias_by_hand():
    # factor 2 down: torch's antialiased triangle has support 2 input pixels; output 0 sits at
    # input coordinate 1.0 -> taps 0, 1, 2 weighted 0.75, 0.75, 0.25 (tap -1 dropped, renormalised)
    img = np.tile(np.arange(4, dtype=np.float32), (4, 1))
    out = resize.resize_bilinear(img, 2)
    np.testing.assert_allclose(out[0], [1.25 / 1.75, 4.0 / 1.75], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], 1.25 / 1.75, rtol=1e-6)


def test_resize_nearest_pixel_centres():
    label = np.arange(16).reshape(4, 4)
    # 4 -> 2: output pixel i takes input floor((i + 0.5) * 2) = 1, 3
    assert resize.resize_nearest(label, 2).tolist() == [[5, 7], [13, 15]]


# ---------------------------------------------------------------- composition and config
def test_preprocess_slice_without_resize_is_the_equations():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100, 600, (6, 7)).astype(np.float32)
    cfg = PipelineConfig(size=0)
    chosen = masking.draw_intervals(rng, 8, 6)
    out = preprocess_slice(hu, chosen, cfg)
    lung, med = windowing.lung_and_mediastinal(hu, cfg.lung_window, cfg.mediastinal_window)
    assert np.array_equal(out["original"][0], lung) and np.array_equal(out["original"][1], med)
    np.testing.assert_allclose(out["original"][2], edges.edge_channel(lung, med), atol=1e-7)
    assert np.array_equal(out["mask"], masking.tissue_mask(hu, chosen, -1000, 500))
    assert np.array_equal(out["masked"], out["original"] * out["mask"][None])


def test_preprocess_slice_pads_before_windows():
    hu = np.full((4, 8), 40.0, np.float32)
    out = preprocess_slice(hu, np.zeros(8, np.uint8), PipelineConfig(size=8))
    # rows 0-1 and 6-7 are air padding: mediastinal window 0, lung window (-1024+1100)/1200
    assert out["original"][1, 0, 3] == pytest.approx(0.0, abs=1e-6)
    assert out["original"][0, 0, 3] == pytest.approx(76 / 1200, abs=1e-6)
    assert out["hu"][0, 3] == pytest.approx(-1024.0)


@pytest.mark.parametrize("field, value", [
    ("masking", "random"), ("rho", 1.5), ("intervals", 0), ("size", -1), ("dtype", "int8"),
    ("edge_scaling", "auto"), ("hu_range", (500.0, -1000.0)), ("lung_window", (-500.0, 0.0)),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(UserError, match=field):
        PipelineConfig(**{field: value})


def test_config_masked_interval_count():
    assert PipelineConfig().n_masked_intervals == 6
    assert PipelineConfig(rho=0.35).n_masked_intervals == 2
    assert PipelineConfig(rho=0.29, intervals=100).n_masked_intervals == 29
