"""The real JPEG 2000 CT series in ../shared/data: HU identical to pydicom's, geometry right,
and the TotalSegmentator label map on its tissue (a flipped axis would show)."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from tcsmae.cli import main
from tcsmae.store.reader import open_store


@pytest.fixture(scope="module")
def real_case(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "real.zarr"
    code = main([
        "convert", str(shared_data / "totalseg-dicom-series"),
        "--labels", str(shared_data / "totalseg-dicom-series-seg.nii.gz"),
        "-o", str(out), "--workers", "1",
    ])
    assert code == 0
    store = open_store(out)
    assert len(store.case_ids) == 1
    case = store.case_ids[0]
    return store, case, store.image(case)[:], store.label(case)[:], store.case_attrs(case)


@pytest.fixture(scope="module")
def label_ids(shared_data):
    names = json.loads((shared_data / "totalsegmentator-labels.json").read_text())
    by_name = {str(v): int(k) for k, v in names.items()}
    return by_name


def test_hu_identical_to_pydicom_per_sorted_slice(real_case, shared_data):
    _, _, hu, _, attrs = real_case
    files = sorted((shared_data / "totalseg-dicom-series").glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial: normal = +z
    assert hu.shape == (len(files), 512, 512)
    assert hu.dtype == np.int16
    for k, ds in enumerate(datasets):
        ref = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu[k], ref, err_msg=f"slice {k}")
    assert attrs["z_positions_mm"] == [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert attrs["origin_mm"] == [float(v) for v in datasets[0].ImagePositionPatient]


def test_geometry(real_case):
    _, case, _, _, attrs = real_case
    assert attrs["spacing_mm"] == pytest.approx([2.0, 0.9765625, 0.9765625])
    z = np.array(attrs["z_positions_mm"])
    assert np.all(np.diff(z) == pytest.approx(2.0))
    assert z[0] == pytest.approx(-804.5) and z[-1] == pytest.approx(-766.5)
    np.testing.assert_allclose(attrs["direction"], np.eye(3))
    assert attrs["series_uid"] == "" and attrs["patient_id"] == ""  # anonymised
    assert case.startswith("dcm-")  # digest of MediaStorageSOPInstanceUIDs
    assert attrs["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.90"]
    assert attrs["warnings"] == []


def _median_hu(hu, labels, ids) -> float:
    mask = np.isin(labels, ids)
    assert mask.sum() > 100
    return float(np.median(hu[mask]))


def _structure_ids(label_ids, prefix: str) -> list[int]:
    return [i for name, i in label_ids.items() if name.startswith(prefix)]


def test_labels_sit_on_their_tissue_and_a_flip_would_show(real_case, label_ids):
    _, _, hu, labels, _ = real_case
    checks = {
        "liver": ([label_ids["liver"]], 60, 200),
        "spleen": ([label_ids["spleen"]], 60, 200),
        "aorta": ([label_ids["aorta"]], 130, 300),
        "vertebrae": (_structure_ids(label_ids, "vertebrae_"), 150, 2000),
        "ribs": (_structure_ids(label_ids, "rib_"), 150, 2000),
    }
    for name, (ids, lo, hi) in checks.items():
        med = _median_hu(hu, labels, ids)
        assert lo <= med <= hi, f"{name}: median {med} HU outside [{lo}, {hi}]"

    # the same statistics with the label map flipped left-right or front-back fail
    for axis in (2, 1):
        flipped = np.flip(labels, axis=axis)
        failed = []
        for name, (ids, lo, hi) in checks.items():
            med = _median_hu(hu, flipped, ids)
            if not lo <= med <= hi:
                failed.append(name)
        assert {"aorta", "vertebrae", "ribs"} <= set(failed), f"flip on axis {axis} fails only {failed}"
    aorta = [label_ids["aorta"]]
    assert abs(_median_hu(hu, np.flip(labels, axis=2), aorta) - _median_hu(hu, labels, aorta)) > 50
