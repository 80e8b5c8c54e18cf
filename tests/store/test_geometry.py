"""Orientation: NIfTI (any axis layout) <-> the store's (Z, Y, X) LPS grid, exactly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tcsmae.store.geometry import Geometry, grid_mismatch, nifti_to_store_grid, store_to_nifti

SHAPE = (5, 6, 7)  # source array axes (i, j, k), deliberately all different


def _affine(perm: tuple[int, int, int], signs: tuple[int, int, int], spacing=(0.8, 1.3, 2.5),
            offset=(-40.0, 12.5, 101.0)) -> np.ndarray:
    """RAS affine whose source axis a runs along world axis perm[a] with sign signs[a]."""
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for a in range(3):
        aff[perm[a], a] = signs[a] * spacing[a]
    aff[:3, 3] = offset
    return aff


def _rotation_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    r = np.eye(4)
    r[:2, :2] = [[c, -s], [s, c]]
    return r


LAYOUTS = {
    "RAS": _affine((0, 1, 2), (1, 1, 1)),
    "LPS": _affine((0, 1, 2), (-1, -1, 1)),
    "LAS": _affine((0, 1, 2), (-1, 1, 1)),  # dcm2niix-style
    "PSR": _affine((1, 2, 0), (-1, 1, 1)),  # permuted axes
    "SLA-inferior": _affine((2, 0, 1), (-1, -1, 1)),  # permuted, slices descending
    "oblique-12deg": _rotation_z(12.0) @ _affine((0, 1, 2), (1, 1, 1)),
}


def _image(affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI as read from disk (affine in float32, as the format stores it)."""
    data = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)  # every value unique
    return nib.Nifti1Image.from_bytes(nib.Nifti1Image(data, affine).to_bytes())


def _source_lps_of_value(img: nib.Nifti1Image, values: np.ndarray) -> np.ndarray:
    """LPS position (N, 3) of the source voxels holding `values` (unique values)."""
    data = np.asarray(img.dataobj)
    idx = np.stack(np.unravel_index(values, data.shape), axis=1)  # since data = arange
    assert np.array_equal(data[tuple(idx.T)], values)
    ras = nib.affines.apply_affine(img.affine, idx)
    return ras * np.array([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_store_grid_keeps_every_voxel_at_its_world_position(name):
    img = _image(LAYOUTS[name])
    arr, geom = nifti_to_store_grid(img)
    assert sorted(arr.shape) == sorted(SHAPE)
    k, j, i = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
    index = np.stack([k.ravel(), j.ravel(), i.ravel()], axis=1)
    store_lps = nib.affines.apply_affine(geom.lps_affine_zyx(), index)
    np.testing.assert_allclose(store_lps, _source_lps_of_value(img, arr.ravel()), atol=1e-9)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if not n.startswith("oblique")])
def test_store_axes_run_left_posterior_superior(name):
    _, geom = nifti_to_store_grid(_image(LAYOUTS[name]))
    np.testing.assert_allclose(np.asarray(geom.direction), np.eye(3), atol=1e-12)
    assert geom.warnings == ()
    dz = np.diff(geom.z_positions_mm)
    np.testing.assert_allclose(dz, geom.spacing_mm[0])  # ascending along the normal


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_round_trip_gives_back_the_source_layout_and_affine(name):
    img = _image(LAYOUTS[name])
    arr, geom = nifti_to_store_grid(img)
    back = store_to_nifti(arr, geom.to_attrs())
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
    np.testing.assert_array_equal(back.affine, img.affine)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_without_source_affine_the_nifti_is_ras_with_the_same_world_mapping(name):
    img = _image(LAYOUTS[name])
    arr, geom = nifti_to_store_grid(img)
    attrs = {k: v for k, v in geom.to_attrs().items() if not k.startswith("source_")}
    out = store_to_nifti(arr, attrs)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    data = np.asarray(out.dataobj)
    idx = np.stack(np.unravel_index(np.arange(data.size), data.shape), axis=1)
    out_lps = nib.affines.apply_affine(out.affine, idx) * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(out_lps, _source_lps_of_value(img, data.ravel()), atol=1e-9)


def test_known_point_lands_at_the_expected_index():
    # RAS image, 1 mm voxels, voxel (i, j, k) at RAS (i - 10, j - 20, k + 5)
    nx, ny, nz = 12, 9, 4
    aff = np.eye(4)
    aff[:3, 3] = (-10.0, -20.0, 5.0)
    data = np.zeros((nx, ny, nz), np.int16)
    data[2, 7, 1] = 1000  # RAS (-8, -13, 6): 8 mm left, 13 mm posterior -> LPS (8, 13, 6)
    arr, geom = nifti_to_store_grid(nib.Nifti1Image(data, aff))
    hits = np.argwhere(arr == 1000)
    # store: z = k; y runs A->P so y = ny-1-j; x runs R->L so x = nx-1-i
    assert hits.tolist() == [[1, ny - 1 - 7, nx - 1 - 2]]
    lps = geom.lps_affine_zyx() @ np.array([*hits[0], 1.0])
    np.testing.assert_allclose(lps[:3], [8.0, 13.0, 6.0])
    # The first column of the store lies at the patient's right (most negative LPS x)
    assert geom.origin_mm[0] == pytest.approx(-(nx - 1 - 10.0))


def test_known_point_in_an_las_image():
    nx, ny, nz = 6, 5, 3
    aff = np.diag([-2.0, 2.0, 3.0, 1.0])  # i runs toward the left, j anterior
    aff[:3, 3] = (10.0, -4.0, 0.0)
    data = np.zeros((nx, ny, nz), np.int16)
    data[1, 3, 2] = 7  # RAS (8, 2, 6) -> LPS (-8, -2, 6)
    arr, geom = nifti_to_store_grid(nib.Nifti1Image(data, aff))
    assert np.argwhere(arr == 7).tolist() == [[2, ny - 1 - 3, 1]]  # x not flipped, y flipped
    lps = geom.lps_affine_zyx() @ np.array([2, ny - 1 - 3, 1, 1.0])
    np.testing.assert_allclose(lps[:3], [-8.0, -2.0, 6.0])


def test_oblique_keeps_exact_direction_and_warns():
    img = _image(LAYOUTS["oblique-12deg"])
    _, geom = nifti_to_store_grid(img)
    d = np.asarray(geom.direction)
    c, s = np.cos(np.radians(12.0)), np.sin(np.radians(12.0))
    # store x runs toward the left: LPS of RAS (-c, -s, 0) -> (c, s, 0)
    np.testing.assert_allclose(d[:, 0], [c, s, 0.0], atol=1e-6)  # float32 affine
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-6)
    assert any("oblique" in w for w in geom.warnings)


def test_scaled_values_are_applied():
    data = np.array([[[0, 10], [20, 30]]] * 2, dtype=np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -1000.0)
    img = nib.Nifti1Image.from_bytes(img.to_bytes())
    arr, _ = nifti_to_store_grid(img)
    assert sorted(np.unique(arr).tolist()) == [-1000.0, -995.0, -990.0, -985.0]
    raw, _ = nifti_to_store_grid(img, scaled=False)
    assert raw.dtype == np.int16 and raw.max() == 30


def test_grid_mismatch():
    img = _image(LAYOUTS["RAS"])
    arr, geom = nifti_to_store_grid(img)
    assert grid_mismatch(arr.shape, geom, arr.shape, geom) is None
    shifted = LAYOUTS["RAS"].copy()
    shifted[0, 3] += 0.8  # one voxel to the right
    _, geom2 = nifti_to_store_grid(_image(shifted))
    assert "differ by up to 0.8" in grid_mismatch(arr.shape, geom, arr.shape, geom2)
    tiny = LAYOUTS["RAS"].copy()
    tiny[0, 3] += 1e-5  # float32 rounding of an affine: same grid
    _, geom3 = nifti_to_store_grid(_image(tiny))
    assert grid_mismatch(arr.shape, geom, arr.shape, geom3) is None
    assert "shape" in grid_mismatch(arr.shape, geom, (1, 2, 3), geom)


def test_geometry_attrs_round_trip():
    _, geom = nifti_to_store_grid(_image(LAYOUTS["PSR"]))
    again = Geometry.from_attrs(geom.to_attrs())
    assert again == geom


def test_real_dicom_label_map_agrees_with_the_dicom_converters_alignment(shared_data, tmp_path):
    """Two independent paths put the real NIfTI label map (LAS) on the real DICOM grid:
    the DICOM converter (through both affines) and nifti_to_store_grid. They must agree
    voxel for voxel, and the geometries must describe the same grid."""
    from tcsmae.cli import main as cli
    from tcsmae.store.reader import open_store

    seg_path = shared_data / "totalseg-dicom-series-seg.nii.gz"
    out = tmp_path / "real.zarr"
    assert cli(["convert", str(shared_data / "totalseg-dicom-series"), "--labels", str(seg_path), "-o", str(out),
                "--workers", "1"]) == 0
    store = open_store(out)
    (cid,) = store.case_ids
    lab, geom = nifti_to_store_grid(nib.load(seg_path))
    np.testing.assert_array_equal(lab, store.label(cid)[...])
    dicom_geom = Geometry.from_attrs(store.case_attrs(cid))
    assert grid_mismatch(lab.shape, geom, store.image(cid).shape, dicom_geom) is None
    np.testing.assert_allclose(geom.z_positions_mm, dicom_geom.z_positions_mm, atol=1e-3)


@pytest.mark.parametrize("name", ["LAS", "PSR", "oblique-12deg"])
def test_even_grid_slice_positions_and_both_affines_agree(name):
    """Without per-slice positions, slice_positions_mm, voxel_to_lps ([x, y, z, 1]) and
    lps_affine_zyx ([z, y, x, 1]) describe one grid."""
    arr, geom = nifti_to_store_grid(_image(LAYOUTS[name]))
    assert geom.positions_mm is None
    z = arr.shape[0]
    pos = geom.slice_positions_mm()
    assert pos.shape == (z, 3)
    zyx = np.stack([np.arange(z), np.zeros(z), np.zeros(z), np.ones(z)], axis=1)
    np.testing.assert_allclose(pos, (zyx @ geom.lps_affine_zyx().T)[:, :3], atol=1e-9)
    xyz = zyx[:, [2, 1, 0, 3]]
    np.testing.assert_allclose(pos, (xyz @ geom.voxel_to_lps().T)[:, :3], atol=1e-9)
    np.testing.assert_allclose(geom.slice_step_mm(), pos[1] - pos[0], atol=1e-9)


def test_per_slice_positions_give_the_true_step_and_stay_out_of_the_attrs():
    """A tilted series: positions move off the slice normal; voxel_to_lps follows them,
    lps_affine_zyx keeps the normal, and the stored attributes do not hold positions."""
    positions = tuple((0.0, 0.5 * k, 2.0 * k) for k in range(4))  # y drifts: tilted
    geom = Geometry(spacing_mm=(2.0, 0.7, 0.7), origin_mm=positions[0], direction=tuple(map(tuple, np.eye(3))),
                    z_positions_mm=tuple(p[2] for p in positions), positions_mm=positions)
    np.testing.assert_array_equal(geom.slice_positions_mm(), np.array(positions))
    np.testing.assert_allclose(geom.slice_step_mm(), [0.0, 0.5, 2.0])
    np.testing.assert_allclose(geom.voxel_to_lps() @ [0, 0, 3, 1], [0.0, 1.5, 6.0, 1.0])
    np.testing.assert_allclose(geom.lps_affine_zyx() @ [3, 0, 0, 1], [0.0, 0.0, 6.0, 1.0])
    assert "positions_mm" not in geom.to_attrs()
    again = Geometry.from_attrs(geom.to_attrs())
    assert again.positions_mm is None and again.z_positions_mm == geom.z_positions_mm
