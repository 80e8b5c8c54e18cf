"""DSC and HD95 on shapes with known answers, checked against an independent computation.

The reference here shares no code with tcsmae.finetune.metrics: surfaces come from explicit
neighbour shifts, distances from a k-d tree over surface points in mm.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from tcsmae.finetune.metrics import dice, hausdorff_percentile, hd95, score_label_maps, summarise


def _surface_points_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """(P, 3) mm coordinates of voxels with a background face neighbour (outside = background)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner) * np.asarray(spacing, dtype=np.float64)


def _brute_hd(pred, ref, spacing, q):
    a, b = _surface_points_mm(pred, spacing), _surface_points_mm(ref, spacing)
    d_ab = cKDTree(b).query(a)[0]
    d_ba = cKDTree(a).query(b)[0]
    return max(np.percentile(d_ab, q), np.percentile(d_ba, q))


def _sphere(shape, center, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    c = [ci * s for ci, s in zip(center, spacing)]
    return sum((g - ci) ** 2 for g, ci in zip(grids, c)) <= radius_mm**2


SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.7, 0.9)]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_offset_cubes(spacing):
    n, d = 12, 3
    pred = np.zeros((30, 30, 30), bool)
    ref = np.zeros_like(pred)
    pred[5:5 + n, 5:5 + n, 5:5 + n] = True
    ref[5:5 + n, 5:5 + n, 5 + d:5 + d + n] = True  # shifted by d voxels along x
    # overlap is (n - d) n^2 of n^3 each: DSC = (n - d) / n exactly
    assert dice(pred, ref) == pytest.approx((n - d) / n)
    # the classic Hausdorff distance of a pure shift is the shift itself
    assert hausdorff_percentile(pred, ref, spacing, 100.0) == pytest.approx(d * spacing[2])
    got = hd95(pred, ref, spacing)
    assert got == pytest.approx(_brute_hd(pred, ref, spacing, 95), rel=1e-9, abs=1e-9)
    assert 0 < got <= d * spacing[2] + 1e-9


@pytest.mark.parametrize("spacing", SPACINGS)
def test_concentric_spheres(spacing):
    shape = (40, 60, 60)
    center = (20, 30, 30)
    r1, r2 = 9.0, 13.0
    pred = _sphere(shape, center, r1, spacing)
    ref = _sphere(shape, center, r2, spacing)
    got = hd95(pred, ref, spacing)
    assert got == pytest.approx(_brute_hd(pred, ref, spacing, 95), rel=1e-9, abs=1e-9)
    # surface-to-surface distance is r2 - r1, blurred by at most about a voxel
    assert abs(got - (r2 - r1)) <= max(spacing) + 1e-9
    expected_dsc = 2 * pred.sum() / (pred.sum() + ref.sum())  # pred inside ref
    assert dice(pred, ref) == pytest.approx(expected_dsc)
    assert dice(pred, ref) == pytest.approx(2 * r1**3 / (r1**3 + r2**3), abs=0.05)


def test_identical_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.random((10, 20, 20)) > 0.7
    b = rng.random((10, 20, 20)) > 0.7
    assert dice(a, a) == 1.0
    assert hd95(a, a, (3, 1, 1)) == 0.0
    assert hd95(a, b, (3, 1, 1)) == pytest.approx(hd95(b, a, (3, 1, 1)))
    assert hd95(a, b, (3, 1, 1)) == pytest.approx(_brute_hd(a, b, (3, 1, 1), 95))


def test_structure_on_array_border_counts_as_surface():
    pred = np.zeros((5, 8, 8), bool)
    pred[:, :, :4] = True  # touches five borders
    ref = np.zeros_like(pred)
    ref[:, :, :2] = True
    assert hd95(pred, ref, (1, 1, 1)) == pytest.approx(_brute_hd(pred, ref, (1, 1, 1), 95))


def test_empty_prediction_or_reference_gives_none_not_nan():
    full = np.zeros((4, 6, 6), bool)
    full[1:3, 2:4, 2:4] = True
    empty = np.zeros_like(full)
    assert dice(empty, full) == 0.0  # a missed structure is a real failure
    assert dice(full, empty) is None  # structure absent from the case
    assert dice(empty, empty) is None
    assert hd95(empty, full, (1, 1, 1)) is None
    assert hd95(full, empty, (1, 1, 1)) is None
    mean, n_undefined = summarise([0.5, None, 1.0, None])
    assert mean == pytest.approx(0.75) and n_undefined == 2
    assert summarise([None, None]) == (None, 2)


def test_label_maps_classes_and_groups():
    ref = np.zeros((6, 10, 10), np.int64)
    ref[1:5, 1:5, 1:5] = 1
    ref[1:5, 5:9, 1:5] = 2
    pred = ref.copy()
    pred[1:5, 5:9, 1:5] = 1  # class 2 predicted as class 1
    scores = score_label_maps(pred, ref, (1, 1, 1), ["a", "b", "c"], {"ab": ["a", "b"]})
    assert scores["classes"]["a"].dsc == pytest.approx(2 * 64 / (128 + 64))
    assert scores["classes"]["b"].dsc == 0.0 and scores["classes"]["b"].hd95_mm is None
    assert scores["classes"]["c"].dsc is None  # absent everywhere
    assert scores["groups"]["ab"].dsc == 1.0 and scores["groups"]["ab"].hd95_mm == 0.0
