"""Aligning NIfTI label maps (RAS) to DICOM grids (LPS): any axis order and flips line up
voxel for voxel; any other grid is refused, never resampled."""

from __future__ import annotations

import numpy as np
import pytest

from tcsmae.cli import main
from tcsmae.convert.label_alignment import LabelGridError, align_labels
from tcsmae.store.reader import open_store

from dicom_factory import ct_series, dicom_affine, write_nifti_labels, write_series


def _grid(series):
    a = dicom_affine(series)
    z = series.hu.shape[0]
    positions = np.array([a[:3, 3] + k * a[:3, 2] for k in range(z)])
    return a, positions


def _labels(series) -> np.ndarray:
    lab = np.zeros(series.hu.shape, np.uint8)
    lab[series.hu > 500] = 3  # spine
    lab[(series.hu > -150) & (series.hu < -50)] = 2  # fat on the patient's right
    lab[1, 2:5, 20:30] = 7  # an asymmetric marker: any flip shows
    return lab


@pytest.mark.parametrize(
    "axes,flips",
    [((0, 1, 2), (False, False, False)), ((0, 1, 2), (False, True, False)), ((0, 1, 2), (True, True, True)),
     ((1, 0, 2), (False, True, False)), ((2, 0, 1), (True, False, True))],
)
def test_label_map_in_any_axis_order_lines_up(tmp_path, axes, flips):
    s = ct_series(n=5, rows=32, cols=28)
    lab = _labels(s)
    a, positions = _grid(s)
    path = write_nifti_labels(lab, a, tmp_path / "seg.nii.gz", axes=axes, flips=flips)
    got = align_labels(path, a, positions, s.hu.shape)
    assert got.shape == s.hu.shape
    np.testing.assert_array_equal(got, lab)


def test_oblique_orientation_lines_up(tmp_path):
    c, sn = np.cos(np.radians(20)), np.sin(np.radians(20))
    s = ct_series(n=4, orientation=(c, sn, 0.0, 0.0, 0.0, -1.0))  # oblique coronal
    lab = _labels(s)
    a, positions = _grid(s)
    path = write_nifti_labels(lab, a, tmp_path / "seg.nii.gz", flips=(True, False, True))
    np.testing.assert_array_equal(align_labels(path, a, positions, s.hu.shape), lab)


@pytest.mark.parametrize("change,message", [
    ("shift", "shifted by"), ("spacing", "rotated or scaled"), ("shape", "does not match"), ("rotation", "rotated or scaled"),
])
def test_label_map_on_another_grid_is_refused(tmp_path, change, message):
    s = ct_series(n=5)
    lab = _labels(s)
    a, positions = _grid(s)
    other = a.copy()
    if change == "shift":
        other[:3, 3] += other[:3, 0] * 0.5  # half a voxel along x
    elif change == "spacing":
        other[:3, 0] *= 1.1
    elif change == "shape":
        lab = lab[:, :, :-1]
    else:
        t = np.radians(5)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        other[:3, :3] = rot @ other[:3, :3]
    path = write_nifti_labels(lab, other, tmp_path / "seg.nii.gz")
    with pytest.raises(LabelGridError, match=message):
        align_labels(path, a, positions, s.hu.shape)


def test_series_with_a_gap_cannot_take_a_label_map(tmp_path):
    s = ct_series(n=6)
    a, positions = _grid(s)
    lab = _labels(s)
    path = write_nifti_labels(lab[:5], a, tmp_path / "seg.nii.gz")
    gapped = np.delete(positions, 2, axis=0)  # 5 slices whose step is not uniform
    uniform = a.copy()
    uniform[:3, 2] = (gapped[-1] - gapped[0]) / 4
    with pytest.raises(LabelGridError):
        align_labels(path, uniform, gapped, (5, 32, 32))


def test_float_label_map_with_integer_values_is_accepted_fractions_refused(tmp_path):
    from tcsmae.errors import UserError

    s = ct_series(n=4)
    a, positions = _grid(s)
    lab = _labels(s)
    path = write_nifti_labels(lab, a, tmp_path / "f.nii.gz", dtype=np.float32)
    got = align_labels(path, a, positions, s.hu.shape)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, lab)
    path = write_nifti_labels(lab + 0.5, a, tmp_path / "g.nii.gz", dtype=np.float32)
    with pytest.raises(UserError, match="non-integer"):
        align_labels(path, a, positions, s.hu.shape)


def test_cli_with_labels_and_a_misaligned_label_map(tmp_path, capsys):
    s = ct_series(n=5)
    write_series(s.datasets, tmp_path / "s")
    lab = _labels(s)
    a, _ = _grid(s)
    write_nifti_labels(lab, a, tmp_path / "good.nii.gz")
    assert main(["convert", str(tmp_path / "s"), "--labels", str(tmp_path / "good.nii.gz"), "-o", str(tmp_path / "o.zarr"), "--workers", "1"]) == 0
    store = open_store(tmp_path / "o.zarr")
    case = store.case_ids[0]
    np.testing.assert_array_equal(store.label(case)[:], lab)
    assert store.case_attrs(case)["labels_source"].endswith("good.nii.gz")

    # labels added to a case converted without them: a changed source, not 'up to date'
    assert main(["convert", str(tmp_path / "s"), "-o", str(tmp_path / "later.zarr"), "--workers", "1"]) == 0
    args = ["convert", str(tmp_path / "s"), "--labels", str(tmp_path / "good.nii.gz"), "-o", str(tmp_path / "later.zarr"), "--workers", "1"]
    capsys.readouterr()
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "from the same DICOM files, but a label map was added" in out and "--overwrite" in out
    assert "different DICOM files" not in out
    assert main([*args, "--overwrite"]) == 0
    np.testing.assert_array_equal(open_store(tmp_path / "later.zarr").label(case)[:], lab)

    shifted = a.copy()
    shifted[:3, 3] += shifted[:3, 2]  # one slice off
    write_nifti_labels(lab, shifted, tmp_path / "bad.nii.gz")
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "s"), "--labels", str(tmp_path / "bad.nii.gz"), "-o", str(tmp_path / "p.zarr"), "--workers", "1"])
    out = capsys.readouterr()
    assert code == 1
    assert "bad.nii.gz" in out.out and "not resampled" in out.out
    assert not (tmp_path / "p.zarr").exists()  # nothing converted: no new empty store
